"""``nimblelm bench spec``: speculative decoding strategies against autoregressive decoding,
nimblelm and transformers, greedy, batch 1, fp32, on the same prompts.

The target is a random attention model (the ``attention-small`` preset with 8 layers, ~15.7M
parameters). Random weights give no reason for a drafter to agree with the target, so the
target gets some structure: weights are scaled to std ``0.02 * weight_scale`` (sharp, varied
predictions rather than one repeated token), and the residual outputs (attention o_proj, FFN
down_proj) of layers 1.. are scaled by ``deep_scale``, so deeper layers only refine the first
layer's prediction. Drafters:

* ``perfect``: the target itself (acceptance upper bound; costs as much as the target);
* ``layer-skip``: the target's embedding + first layer + final norm + head (1 of 8 layers,
  self-speculation style; agrees often, thanks to ``deep_scale``);
* ``tiny``: an independent random 1-layer model of hidden size 64 (cheap, almost never right:
  the overhead floor).

Two prompt sets: ``random`` (uniform random tokens) and ``repetitive`` (a random segment
repeated), the latter for prompt lookup (a random target does not copy its prompt, so lookup
drafts are accepted only where the target's own output repeats; otherwise the lookup rows
measure its overhead). Rows: nimblelm ``autoregressive``, ``sps`` (4-token chains), ``tree``
(EAGLE-2 dynamic trees, fixed size and ``auto``), ``lookup``; transformers ``generate()``
plain, with ``assistant_model=`` (the same drafters converted with
``nimblelm.integrations.hf.to_hf``) and with ``prompt_lookup_num_tokens=``; and nimblelm's
engine verifying on that same transformers model (``nl+hf`` rows: ``nl.generate`` on an
``HFTarget``, which verifies draft trees with a 4-D tree mask). The assistants
draft fixed chains of ``--sps-tokens`` tokens like ``sps`` (constant schedule, confidence
threshold 0); ``--hf-assistant-defaults`` keeps transformers' defaults instead (a heuristic
chain length, and drafting stops once the assistant's probability for its token falls below
0.4, which on flat random distributions means one draft token per call).

Per row: tau = new tokens per target call that emitted tokens (bonus included; for
transformers every target call emits), target calls per new token (prefill included),
tokens/s = new tokens / wall time of the whole ``generate`` call (prefill included), speedup
over nimblelm's and over transformers' autoregressive rows; same = the tokens equal the
autoregressive output of the same target (nimblelm's model for nimblelm rows, the transformers
model for the transformers and nl+hf rows). Medians over prompts x repeats,
rows interleaved so drifting machine load hits them alike, one untimed warm-up per row (which
also calibrates ``tree-auto``: its target-cost measurement is cached per target).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .report import loadavg, machine_info, run_and_report

import nimblelm as nl

from ..generation.speculative.drafters import DraftModelDrafter, PromptLookupDrafter
from ..generation.speculative.drafters.dynamic_tree import DynamicTreeDrafter

TARGETS: dict[str, dict[str, Any]] = {
    "full": dict(vocab_size=8192, hidden_size=384, num_layers=8, num_heads=6, num_kv_heads=2,
                 intermediate_size=1024, max_seq_len=2048),  # 15.74M parameters (tied embeddings)
    "quick": dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=128, max_seq_len=512),
}
# option -> (default, default with --quick)
DEFAULTS = {"new_tokens": (64, 8), "prompt_len": (64, 16), "prompts": (3, 2), "depth": (5, 3), "top_k": (8, 4),
            "total_tokens": (32, 10)}
TINY_DRAFT = dict(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=128, head_dim=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nimblelm bench spec", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="write every measured number to FILE")
    parser.add_argument("--quick", action="store_true", help="tiny models and few tokens (a smoke test)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per generation (default 64; quick 8)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt length (default 64; quick 16)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per prompt set (default 3; quick 2)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per prompt and row")
    parser.add_argument("--weight-scale", type=float, default=5.0, help="target weights: std 0.02 x this")
    parser.add_argument("--deep-scale", type=float, default=0.05,
                        help="scale of the residual outputs of target layers 1.. (structure for drafters)")
    parser.add_argument("--depth", type=int, default=None, help="tree: expansion steps (default 5; quick 3)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="tree: children per node and nodes expanded (default 8; quick 4)")
    parser.add_argument("--total-tokens", type=int, default=None,
                        help="tree: draft nodes kept in the fixed-size rows (default 32; quick 10)")
    parser.add_argument("--sps-tokens", type=int, default=4, help="sps: draft chain length")
    parser.add_argument("--lookup-tokens", type=int, default=10, help="prompt lookup: tokens per draft (both engines)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    parser.add_argument("--hf-assistant-defaults", action="store_true",
                        help="keep transformers' assisted-generation defaults instead of matching sps (see above)")
    parser.add_argument("--model", help="a trained target (shipped name or dir): runs the held-out-prompt suite "
                        "of nimblelm.bench.spec_models instead (see nimblelm bench spec --model X --help)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--model" or a.startswith("--model=") for a in argv):  # trained targets: their own suite
        from . import spec_models

        return spec_models.main(argv)
    args = build_parser().parse_args(argv)
    results = run_and_report(run_spec_bench, format_table, args)
    if results is None:
        return 2
    bad = [f"{r['prompt_set']}/{r['name']}" for r in results["rows"]
           if r["engine"] in ("nimblelm", "nimblelm+hf") and not r["tokens_match"]]
    if bad:
        print(f"error: speculative output differs from autoregressive output in {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def run_spec_bench(args: argparse.Namespace | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run the suite; ``args`` a parsed namespace or None (``kwargs`` override the defaults,
    e.g. ``run_spec_bench(quick=True)``). Returns the JSON dict."""
    options = {**vars(args if args is not None else build_parser().parse_args([])), **kwargs}
    quick = options["quick"]
    for name, (full, small) in DEFAULTS.items():
        options[name] = options[name] if options[name] is not None else (small if quick else full)
    for name in ("new_tokens", "prompt_len", "prompts", "repeats", "depth", "top_k", "total_tokens", "sps_tokens",
                 "lookup_tokens"):
        if options[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {options[name]}")
    torch.set_flush_denormal(True)
    results: dict[str, Any] = {"machine": machine_info(), "settings": {k: v for k, v in options.items() if k != "json"}}
    models = build_models("quick" if quick else "full", options)
    results["models"] = {name: {"parameters": m.num_parameters(), "layers": m.config.num_layers,
                                "hidden_size": m.config.hidden_size} for name, m in models.items()}
    rows, notes = make_rows(models, options)
    results["notes"] = notes
    prompt_sets = make_prompts(models["target"].config.vocab_size, options)
    results["rows"] = []
    for set_name, prompts in prompt_sets.items():
        results["rows"] += bench_prompt_set(set_name, prompts, rows, options)
    results["machine"]["loadavg_end"] = loadavg()
    return results


# -- models, prompts, rows -------------------------------------------------------------------------
def build_models(size: str, options: dict[str, Any]) -> dict[str, nl.LanguageModel]:
    """The structured random target and its three drafters (module docstring), fp32."""
    torch.manual_seed(options["seed"])
    config = nl.ModelConfig.from_preset("attention-small", **TARGETS[size])
    target = nl.LanguageModel(config).float().eval()
    with torch.no_grad():
        for name, param in target.named_parameters():
            if param.dim() >= 2:
                param.mul_(options["weight_scale"])
            if name.split(".")[-2] in ("o_proj", "down_proj") and not name.startswith("blocks.0."):
                param.mul_(options["deep_scale"])
    skip = nl.LanguageModel(nl.ModelConfig.from_dict({**config.to_dict(), "num_layers": 1})).float().eval()
    skip.load_state_dict({k: v for k, v in target.state_dict().items()
                          if not k.startswith("blocks.") or k.startswith("blocks.0.")})
    torch.manual_seed(options["seed"] + 1)
    tiny = nl.LanguageModel(nl.ModelConfig.from_dict({**config.to_dict(), **TINY_DRAFT})).float().eval()
    with torch.no_grad():
        for param in tiny.parameters():
            if param.dim() >= 2:
                param.mul_(options["weight_scale"])
    return {"target": target, "perfect": target, "layer-skip": skip, "tiny": tiny}


def make_prompts(vocab: int, options: dict[str, Any]) -> dict[str, list[list[int]]]:
    gen = torch.Generator().manual_seed(options["seed"] + 2)
    length, count = options["prompt_len"], options["prompts"]
    random_set = [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(count)]
    segment = max(4, length // 4)
    repetitive = [(torch.randint(0, vocab, (segment,), generator=gen).tolist() * (length // segment + 1))[:length]
                  for _ in range(count)]
    return {"random": random_set, "repetitive": repetitive}


@dataclass
class Row:
    name: str
    engine: str  # "nimblelm" | "transformers"
    run: Callable[[list[int], int], tuple[list[int], dict]]  # (prompt, new tokens) -> (tokens, counts)
    info: dict = field(default_factory=dict)


def make_rows(models: dict[str, nl.LanguageModel], options: dict[str, Any]) -> tuple[list[Row], list[str]]:
    target, drafters = models["target"], {k: models[k] for k in ("perfect", "layer-skip", "tiny")}
    tree_args = dict(depth=options["depth"], top_k=options["top_k"])
    rows = [Row("autoregressive", "nimblelm", _nl_runner(target, "autoregressive", None))]
    for name, draft in drafters.items():
        rows.append(Row(f"sps/{name}", "nimblelm",
                        _nl_runner(target, "sps", DraftModelDrafter(draft, options["sps_tokens"]))))
    for name, draft in drafters.items():
        drafter = DynamicTreeDrafter(draft, total_tokens=options["total_tokens"], **tree_args)
        rows.append(Row(f"tree/{name}", "nimblelm", _nl_runner(target, "tree", drafter)))
    for name in ("layer-skip", "tiny"):
        drafter = DynamicTreeDrafter(drafters[name], total_tokens="auto", **tree_args)
        rows.append(Row(f"tree-auto/{name}", "nimblelm", _nl_runner(target, "tree", drafter), {"drafter": drafter}))
    rows.append(Row("lookup", "nimblelm",
                    _nl_runner(target, "lookup", PromptLookupDrafter(num_tokens=options["lookup_tokens"]))))
    if options["no_hf"]:
        return rows, ["transformers rows skipped (--no-hf)"]
    try:
        from ..integrations.hf import HFTarget, to_hf
    except ImportError as exc:
        return rows, [f"transformers rows skipped: nimblelm.integrations.hf.to_hf is not importable ({exc})"]
    hf_target = to_hf(target)
    rows.append(Row("hf autoregressive", "transformers", _hf_runner(hf_target, {})))
    for name, draft in drafters.items():
        assistant = to_hf(draft)
        if not options["hf_assistant_defaults"]:  # the same chains as sps: fixed length, no early stop
            config = assistant.generation_config
            config.num_assistant_tokens, config.num_assistant_tokens_schedule = options["sps_tokens"], "constant"
            config.assistant_confidence_threshold = 0.0
        rows.append(Row(f"hf assisted/{name}", "transformers", _hf_runner(hf_target, {"assistant_model": assistant})))
    rows.append(Row("hf lookup", "transformers",
                    _hf_runner(hf_target, {"prompt_lookup_num_tokens": options["lookup_tokens"]})))
    return rows + _nl_on_hf_rows(HFTarget(hf_target), drafters, options), []


def _nl_on_hf_rows(hf_target, drafters: dict[str, nl.LanguageModel], options: dict[str, Any]) -> list[Row]:
    """nimblelm's engine verifying on the transformers model (one HFTarget object, so tree-auto's
    cost calibration is kept across runs): sps with each drafter, tree with layer-skip, lookup."""
    rows = [Row(f"nl+hf sps/{name}", "nimblelm+hf",
                _nl_runner(hf_target, "sps", DraftModelDrafter(draft, options["sps_tokens"])))
            for name, draft in drafters.items()]
    tree = DynamicTreeDrafter(drafters["layer-skip"], depth=options["depth"], top_k=options["top_k"],
                              total_tokens=options["total_tokens"])
    rows.append(Row("nl+hf tree/layer-skip", "nimblelm+hf", _nl_runner(hf_target, "tree", tree)))
    rows.append(Row("nl+hf lookup", "nimblelm+hf",
                    _nl_runner(hf_target, "lookup", PromptLookupDrafter(num_tokens=options["lookup_tokens"]))))
    return rows


def _nl_runner(target, strategy: str, drafter) -> Callable:
    def run(prompt: list[int], new_tokens: int) -> tuple[list[int], dict]:
        res = nl.generate(target, prompt, max_new_tokens=new_tokens, strategy=strategy, drafter=drafter)
        stats = res.stats
        return res.tokens[0].tolist(), {"target_calls": stats.target_calls, "rounds": stats.rounds,
                                        "draft_calls": stats.draft_calls, "new_tokens": stats.new_tokens}

    return run


def _hf_runner(hf_model, extra: dict) -> Callable:
    calls = [0]
    hf_model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    def run(prompt: list[int], new_tokens: int) -> tuple[list[int], dict]:
        ids = torch.tensor([prompt])
        before = calls[0]
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, **extra)
        made = calls[0] - before
        tokens = out[0, ids.shape[1]:].tolist()
        return tokens, {"target_calls": made, "rounds": made, "draft_calls": None, "new_tokens": len(tokens)}

    return run


# -- measuring -----------------------------------------------------------------------------------
def bench_prompt_set(set_name: str, prompts: list[list[int]], rows: list[Row], options: dict[str, Any]) -> list[dict]:
    new_tokens = options["new_tokens"]
    print(f"[{set_name}] warm-up of {len(rows)} rows", file=sys.stderr, flush=True)
    for row in rows:
        row.run(prompts[0], new_tokens)
    runs: dict[str, list[dict]] = {row.name: [] for row in rows}
    for repeat in range(options["repeats"]):
        for p, prompt in enumerate(prompts):
            for row in rows:
                start = time.perf_counter()
                tokens, counts = row.run(prompt, new_tokens)
                runs[row.name].append({"prompt": p, "seconds": time.perf_counter() - start, "tokens": tokens, **counts})
            print(f"[{set_name}] repeat {repeat + 1}/{options['repeats']}, prompt {p + 1}/{len(prompts)} done",
                  file=sys.stderr, flush=True)
    return summarise(set_name, rows, runs)


def summarise(set_name: str, rows: list[Row], runs: dict[str, list[dict]]) -> list[dict]:
    references = {name: {r["prompt"]: r["tokens"] for r in runs[name]}
                  for name in ("autoregressive", "hf autoregressive") if name in runs}
    out = []
    for row in rows:
        rs = runs[row.name]
        reference = references["autoregressive" if row.engine == "nimblelm" else "hf autoregressive"]
        summary = {
            "prompt_set": set_name, "name": row.name, "engine": row.engine,
            "tau": statistics.median(r["new_tokens"] / max(r["rounds"], 1) for r in rs),
            "target_calls_per_token": statistics.median(r["target_calls"] / max(r["new_tokens"], 1) for r in rs),
            "tokens_per_s": statistics.median(r["new_tokens"] / r["seconds"] for r in rs),
            "seconds": [r["seconds"] for r in rs],
            "tokens_match": all(r["tokens"] == reference[r["prompt"]] for r in rs),
            "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in rs],
        }
        drafter = row.info.get("drafter")
        if drafter is not None:
            sizes = drafter.chosen_sizes
            summary["chosen_tree_sizes_median"] = statistics.median(sizes) if sizes else None
            cost = drafter.target_cost
            summary["target_cost"] = {"sizes": cost.sizes, "seconds": cost.seconds} if cost else None
        out.append(summary)
    base = {engine: next((s["tokens_per_s"] for s in out if s["name"] == name), None)
            for engine, name in (("nimblelm", "autoregressive"), ("transformers", "hf autoregressive"))}
    for s in out:
        s["speedup_vs_nimblelm_ar"] = s["tokens_per_s"] / base["nimblelm"]
        s["speedup_vs_hf_ar"] = s["tokens_per_s"] / base["transformers"] if base["transformers"] else None
    return out


# -- reporting -------------------------------------------------------------------------------------
def format_table(results: dict[str, Any]) -> str:
    m, s = results["machine"], results["settings"]
    models = ", ".join(f"{k} {v['parameters'] / 1e6:.2f}M" for k, v in results["models"].items() if k != "perfect")
    lines = [f"CPU: {m['cpu_model']} | torch threads {m['torch_threads']} | load {m['loadavg_start']} -> "
             f"{m.get('loadavg_end')}",
             f"greedy, fp32, batch 1: {models}; prompt {s['prompt_len']}, {s['new_tokens']} new tokens, "
             f"median of {s['prompts']} prompts x {s['repeats']} repeats",
             f"tree: depth {s['depth']}, top_k {s['top_k']}, {s['total_tokens']} nodes (auto: chosen per round); "
             f"sps: {s['sps_tokens']} tokens; lookup: {s['lookup_tokens']} tokens", ""]
    header = (f"{'prompts':<11} {'row':<27} {'tau':>5} {'calls/tok':>9} {'tok/s':>8} {'vs nl AR':>8} "
              f"{'vs HF AR':>8} {'same':>5}")
    lines.append(header)
    for r in results["rows"]:
        vs_hf = f"{r['speedup_vs_hf_ar']:>8.2f}" if r["speedup_vs_hf_ar"] is not None else f"{'-':>8}"
        name = r["name"] + (f" (m~{r['chosen_tree_sizes_median']:g})" if r.get("chosen_tree_sizes_median") else "")
        lines.append(f"{r['prompt_set']:<11} {name:<27} {r['tau']:>5.2f} {r['target_calls_per_token']:>9.2f} "
                     f"{r['tokens_per_s']:>8.1f} {r['speedup_vs_nimblelm_ar']:>8.2f} {vs_hf} "
                     f"{'yes' if r['tokens_match'] else 'NO':>5}")
    lines.append("tau: new tokens per target call that emitted tokens (bonus included); calls/tok: target calls per "
                 "new token (prefill included); tok/s: new tokens / wall time incl. prefill; same: tokens equal the "
                 "same target's autoregressive output (nl+hf: nimblelm's engine verifying on the transformers model)")
    lines += [f"note: {n}" for n in results.get("notes", [])]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
