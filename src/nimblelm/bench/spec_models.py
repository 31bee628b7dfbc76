"""``nimblelm bench spec --model NAME``: every decoding strategy on a TRAINED target (the
shipped code models), on prompts cut from held-out stdlib files, greedy and sampled.

Rows per target: nimblelm ``autoregressive``, ``sps``, ``lookup``, ``medusa``, ``hydra``,
``eagle``, ``eagle2`` (the drafters found in the model's ``drafters/`` directory; missing ones
are listed as skipped), and for an attention target that ``to_hf`` can export: transformers
``generate()`` plain, with ``assistant_model=`` (the sps draft LM exported the same way) and
with ``prompt_lookup_num_tokens=``. Every row generates exactly ``--new-tokens`` tokens per
prompt (no stop token) with the same seeds.

Per row and temperature: tokens/s = all new tokens / all wall time (prefill included), tau =
new tokens per target call that emitted tokens (bonus included), speedup over nimblelm's
autoregressive row (and transformers' rows over transformers' plain row), identical = greedy
outputs equal to autoregressive on every prompt, plus the profile that explains a speedup:
draft seconds per round, target (verify + bookkeeping) seconds per round, and the acceptance
by depth, P(round accepts >= d draft tokens). Per target also the verification cost per tree
size: median ms of one target call on an n-token draft tree (n = 1 is the autoregressive
step) after the first prompt, on a scratch cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

import nimblelm as nl

from ..models.checkpoint import resolve_model_path, shipped_model_names
from .report import loadavg, run_and_report

NL_STRATEGIES = ("autoregressive", "sps", "lookup", "medusa", "hydra", "eagle", "eagle2")
KIND_OF = {"sps": "sps", "medusa": "medusa", "hydra": "hydra", "eagle": "eagle", "eagle2": "eagle"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nimblelm bench spec --model NAME", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help="shipped model name or model dir (repeatable; default: all shipped)")
    p.add_argument("--prompts", type=int, default=20, help="held-out prompts (from the model's prompts.json)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--temperatures", default="0,0.7", help="comma-separated; 0 = greedy")
    p.add_argument("--strategies", default=",".join(NL_STRATEGIES))
    p.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--verify-sizes", type=int, default=64, metavar="N",
                   help="profile target calls on trees of 1..N tokens (default 64; 0 = skip)")
    p.add_argument("--json", metavar="FILE")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = run_and_report(run, format_table, args)
    if results is None:
        return 2
    bad = [f"{r['model']}/{r['row']}" for r in results["rows"] if r["temperature"] == 0 and r["identical"] is False]
    if bad:
        print(f"error: greedy output differs from autoregressive in {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def run(args) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    names = args.model or shipped_model_names()
    if not names:
        raise ValueError("no shipped models in this checkout; pass --model DIR")
    temperatures = [float(t) for t in args.temperatures.split(",")]
    strategies = [s for s in args.strategies.split(",") if s]
    rows, skipped, verify = [], [], {}
    for name in names:
        model_rows, model_skipped, verify[name] = bench_model(name, strategies, temperatures, args)
        rows += model_rows
        skipped += model_skipped
    return {"rows": rows, "skipped": skipped, "verify_cost": verify, "new_tokens": args.new_tokens,
            "prompts": args.prompts, "threads": args.threads, "loadavg": loadavg() or [0.0]}


def bench_model(name: str, strategies: list[str], temperatures: list[float],
                args) -> tuple[list[dict], list[str], dict | None]:
    """The rows of one target, the strategies skipped, and its verification cost per tree size."""
    directory = resolve_model_path(name)
    target = nl.load(directory).eval()
    with open(os.path.join(directory, "prompts.json"), encoding="utf-8") as fh:
        prompts = [target.tokenizer.encode(p["text"]).ids for p in json.load(fh)[: args.prompts]]
    runners, skipped = {}, []
    for strategy in strategies:
        try:
            runners[strategy] = NlRunner(target, strategy, load_drafter_for(directory, strategy))
        except nl.CheckpointError as exc:
            skipped.append(f"{name}/{strategy}: {exc}")
    if not args.no_hf:
        hf_rows, hf_skipped = hf_runners(target, directory)
        runners.update(hf_rows)
        skipped += [f"{name}/{s}" for s in hf_skipped]
    rows = []
    for temperature in temperatures:
        print(f"[{name}] temperature {temperature}: {len(runners)} rows x {len(prompts)} prompts", file=sys.stderr,
              flush=True)
        for runner in runners.values():  # warm-up (also calibrates total_tokens='auto')
            runner(prompts[0], 8, temperature, seed=0)
        measured: dict[str, list[dict]] = {row: [] for row in runners}
        for i, prompt in enumerate(prompts):  # rows interleaved per prompt: load drift hits them alike
            for row, runner in runners.items():
                measured[row].append(runner(prompt, args.new_tokens, temperature, seed=i))
        rows += summarise(name, temperature, measured)
    verify = verify_cost(target, prompts[0], args.verify_sizes) if args.verify_sizes > 0 else None
    return rows, skipped, verify


def verify_cost(target, prompt: list[int], largest: int, depth: int = 5, repeats: int = 7) -> dict:
    """Median ms of one target call on a draft tree of n tokens (n = 1: the autoregressive
    step), for n on :func:`size_grid` up to ``largest``, after ``prompt`` on a scratch cache."""
    from ..generation.speculative.drafters.dynamic_tree import measure_target_cost

    with torch.no_grad():
        cost = measure_target_cost(target, prompt, largest, depth, repeats)
    return {"sizes": cost.sizes, "ms": [1000 * s for s in cost.seconds], "context": len(prompt)}


def load_drafter_for(directory: str, strategy: str):
    from ..generation.speculative.drafters import PromptLookupDrafter

    if strategy == "autoregressive":
        return None
    if strategy == "lookup":
        return PromptLookupDrafter()
    return nl.load_drafter(directory, KIND_OF[strategy])


class NlRunner:
    """One nimblelm row: tokens, wall time, rounds, draft time and accepted drafts per round."""

    engine = "nimblelm"

    def __init__(self, target, strategy: str, drafter):
        self.target, self.strategy, self.drafter = target, strategy, drafter

    def __call__(self, prompt: list[int], new_tokens: int, temperature: float, seed: int) -> dict:
        tokens, accepted, stats = [], [], None
        started = time.perf_counter()
        for event in nl.stream(self.target, prompt, max_new_tokens=new_tokens, strategy=self.strategy,
                               drafter=self.drafter, temperature=temperature, seed=seed):
            tokens += event.tokens[0]
            accepted.append(sum(event.from_draft[0]))
            stats = event.stats
        return {"tokens": tokens, "wall_s": time.perf_counter() - started, "rounds": stats.rounds,
                "prefill_s": stats.prefill_s, "draft_s": stats.draft_s, "accepted": accepted}


class HFRunner:
    """One transformers ``generate()`` row (plain, assisted, or prompt lookup)."""

    engine = "transformers"

    def __init__(self, hf_model, extra: dict):
        self.hf_model, self.extra, self.calls = hf_model, extra, 0
        hf_model.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))

    def __call__(self, prompt: list[int], new_tokens: int, temperature: float, seed: int) -> dict:
        ids = torch.tensor([prompt])
        sampling = {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature,
                                                                   "top_k": 0, "top_p": 1.0}
        torch.manual_seed(seed)
        before, started = self.calls, time.perf_counter()
        with torch.no_grad():
            out = self.hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                         min_new_tokens=new_tokens, pad_token_id=0, **sampling, **self.extra)
        wall = time.perf_counter() - started
        calls = self.calls - before
        return {"tokens": out[0, ids.shape[1]:].tolist(), "wall_s": wall, "rounds": max(calls - 1, 1),
                "prefill_s": None, "draft_s": None, "accepted": None}


def hf_runners(target, directory: str) -> tuple[dict, list[str]]:
    """transformers rows for a target ``to_hf`` can export (else skipped, with the reason)."""
    try:
        from ..integrations.hf import to_hf

        hf_target = to_hf(target).eval()
    except (ImportError, NotImplementedError) as exc:
        return {}, [f"transformers rows: {exc}"]
    rows = {"hf autoregressive": HFRunner(hf_target, {}),
            "hf lookup": HFRunner(hf_target, {"prompt_lookup_num_tokens": 10})}
    try:
        assistant = to_hf(nl.load_drafter(directory, "sps").model).eval()
    except (nl.CheckpointError, NotImplementedError) as exc:
        return rows, [f"hf assisted: {exc}"]
    rows["hf assisted (sps draft)"] = HFRunner(hf_target, {"assistant_model": assistant})
    return rows, []


def summarise(model: str, temperature: float, measured: dict[str, list[dict]]) -> list[dict]:
    """One row per strategy: totals over prompts, speedups, identity with autoregressive."""
    def rate(runs):
        return sum(len(r["tokens"]) for r in runs) / sum(r["wall_s"] for r in runs)

    nl_base = rate(measured["autoregressive"]) if "autoregressive" in measured else None
    hf_base = rate(measured["hf autoregressive"]) if "hf autoregressive" in measured else None
    rows = []
    for name, runs in measured.items():
        new = sum(len(r["tokens"]) for r in runs)
        rounds = sum(r["rounds"] for r in runs)
        row = {"model": model, "temperature": temperature, "row": name, "tokens_per_s": rate(runs),
               "tau": new / max(rounds, 1), "speedup": rate(runs) / nl_base if nl_base else None,
               "speedup_vs_hf": rate(runs) / hf_base if hf_base else None, "identical": None}
        reference = measured["hf autoregressive" if name.startswith("hf ") else "autoregressive"] \
            if temperature == 0 else None
        if reference is not None:
            row["identical"] = all(r["tokens"] == ref["tokens"] for r, ref in zip(runs, reference))
        if runs[0]["draft_s"] is not None and rounds:
            decode = sum(r["wall_s"] - r["prefill_s"] for r in runs)
            draft = sum(r["draft_s"] for r in runs)
            row["draft_ms_per_round"] = 1000 * draft / rounds
            row["target_ms_per_round"] = 1000 * (decode - draft) / rounds
            per_round = [a for r in runs for a in r["accepted"]]
            depth = max(per_round, default=0)
            row["accept_by_depth"] = [sum(a >= d for a in per_round) / len(per_round) for d in range(1, depth + 1)]
        rows.append(row)
    return rows


def _short(model: str) -> str:
    """A model's table label: the directory's name when given as a path."""
    return os.path.basename(os.path.normpath(model))


def format_table(results: dict) -> str:
    lines = [f"{results['prompts']} held-out prompts x {results['new_tokens']} new tokens, batch 1, fp32, "
             f"{results['threads']} thread(s); load average {results['loadavg'][0]:.1f}",
             f"{'model':<18}{'temp':>5}  {'row':<24}{'tok/s':>8}{'tau':>6}{'speedup':>9}{'vs hf':>7}{'same':>6}"
             f"{'draft ms':>10}{'target ms':>10}  P(accept >= d), d = 1..",
             ]
    for r in results["rows"]:
        same = {True: "yes", False: "NO", None: "-"}[r["identical"]]
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        vs_hf = f"{r['speedup_vs_hf']:.2f}x" if r["speedup_vs_hf"] else "-"
        draft = f"{r['draft_ms_per_round']:.1f}" if "draft_ms_per_round" in r else "-"
        target = f"{r['target_ms_per_round']:.1f}" if "target_ms_per_round" in r else "-"
        accept = " ".join(f"{p:.2f}" for p in r.get("accept_by_depth", [])[:6])
        lines.append(f"{_short(r['model']):<18}{r['temperature']:>5.1f}  {r['row']:<24}{r['tokens_per_s']:>8.1f}"
                     f"{r['tau']:>6.2f}{speed:>9}{vs_hf:>7}{same:>6}{draft:>10}{target:>10}  {accept}")
    for model, cost in results.get("verify_cost", {}).items():
        if cost:
            lines.append(f"{_short(model)}: ms per target call on an n-token tree (context {cost['context']}; "
                         "x = / one-token step)")
            lines.append("  " + "  ".join(f"{n}: {ms:.1f} ({ms / cost['ms'][0]:.1f}x)"
                                         for n, ms in zip(cost["sizes"], cost["ms"])))
    for note in results["skipped"]:
        lines.append(f"skipped: {note}")
    return "\n".join(lines)
