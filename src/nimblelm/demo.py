"""``nimblelm demo``: the shipped code model continuing a held-out stdlib function, once per
decoding strategy.

Prints the greedy continuation with the draft tokens the target accepted highlighted, then a
table over strategies (autoregressive, sps, lookup, medusa, hydra, eagle, eagle2): tokens/s,
tau (tokens per target call, bonus included), speedup over autoregressive, and whether the
greedy output is identical to autoregressive; then one sampled run. Each strategy runs after
a short warm-up, one at a time, in this process (timings are wall clock on this machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from .errors import NimbleError

STRATEGIES = ("autoregressive", "sps", "lookup", "medusa", "hydra", "eagle", "eagle2")
DRAFTER_KIND = {"sps": "sps", "medusa": "medusa", "hydra": "hydra", "eagle": "eagle", "eagle2": "eagle"}
HIGHLIGHT, RESET = "\033[1;32m", "\033[0m"


def load_prompts(model_dir: str) -> list[dict]:
    """The held-out prompts shipped with a model (``prompts.json``: file, line, text)."""
    path = os.path.join(model_dir, "prompts.json")
    if not os.path.isfile(path):
        raise NimbleError(f"{path} is missing; the demo needs a model directory with held-out prompts "
                          "(the shipped models have one; `nimblelm train corpus` writes prompts.json)")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def load_drafters(model_dir: str, strategies) -> dict:
    import nimblelm as nl

    drafters = {}
    for strategy in strategies:
        kind = DRAFTER_KIND.get(strategy)
        if kind is not None and kind not in drafters:
            drafters[kind] = nl.load_drafter(model_dir, kind)
    return drafters


def run_strategy(model, prompt_ids, strategy, drafter, max_new_tokens, **sampling) -> dict:
    """One generation through nl.stream: tokens, which came from accepted drafts, stats."""
    import nimblelm as nl

    tokens, from_draft, stats = [], [], None
    for event in nl.stream(model, prompt_ids, max_new_tokens=max_new_tokens, strategy=strategy, drafter=drafter,
                           **sampling):
        tokens += event.tokens[0]
        from_draft += event.from_draft[0]
        stats = event.stats
    return {"tokens": tokens, "from_draft": from_draft, "tokens_per_s": stats.tokens_per_s,
            "tau": stats.accepted_per_call, "target_calls": stats.target_calls}


def highlighted(tokenizer, tokens: list[int], from_draft: list[bool], color: bool) -> str:
    """The text, accepted draft tokens in bold green (or [[...]] without a terminal)."""
    pieces = []
    for token, drafted in zip(tokens, from_draft):
        text = tokenizer.decode([token])
        if drafted:
            text = f"{HIGHLIGHT}{text}{RESET}" if color else f"[[{text}]]"
        pieces.append(text)
    return "".join(pieces)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nimblelm demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="nimble-code-attn", help="shipped model name or model directory")
    p.add_argument("--prompt-index", type=int, default=0, help="which held-out prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--highlight", default="eagle2", help="strategy whose output is printed highlighted")
    p.add_argument("--temperature", type=float, default=0.7, help="for the sampled run")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for batch-1 decode here)")
    p.add_argument("--json", metavar="FILE")
    return p


def main(argv: list[str] | None = None) -> int:
    import nimblelm as nl
    from .models.checkpoint import resolve_model_path

    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or "autoregressive" not in strategies:
        raise NimbleError(f"--strategies must include autoregressive and only {', '.join(STRATEGIES)}; got {unknown}")
    model_dir = resolve_model_path(args.model)
    model = nl.load(model_dir).eval()
    if model.tokenizer is None:
        raise NimbleError(f"{model_dir} has no tokenizer.json; the demo needs a model trained on text")
    prompts = load_prompts(model_dir)
    if not 0 <= args.prompt_index < len(prompts):
        raise NimbleError(f"--prompt-index must be in [0, {len(prompts)}), got {args.prompt_index}")
    prompt = prompts[args.prompt_index]
    prompt_ids = model.tokenizer.encode(prompt["text"]).ids
    drafters = load_drafters(model_dir, strategies)
    started = time.perf_counter()
    run_strategy(model, prompt_ids, "autoregressive", None, 8)  # warm-up (allocator, kernels)
    rows = {}
    for strategy in strategies:
        drafter = drafters.get(DRAFTER_KIND.get(strategy))
        rows[strategy] = run_strategy(model, prompt_ids, strategy, drafter, args.max_new_tokens)
    reference = rows["autoregressive"]
    for row in rows.values():
        row["speedup"] = row["tokens_per_s"] / reference["tokens_per_s"]
        row["identical"] = row["tokens"] == reference["tokens"]
    color = sys.stdout.isatty()
    shown = args.highlight if args.highlight in rows else strategies[-1]
    print(f"model: {args.model}    prompt: held-out {prompt['file']}:{prompt['line']} ({len(prompt_ids)} tokens)")
    print("-" * 78)
    print(prompt["text"][-400:], end="")
    print(highlighted(model.tokenizer, rows[shown]["tokens"], rows[shown]["from_draft"], color))
    print("-" * 78)
    print(f"({shown}; accepted draft tokens {'in green' if color else 'in [[...]]'})\n")
    print(format_table(rows, args.max_new_tokens))
    sampled_strategy = "eagle2" if "eagle2" in rows else strategies[-1]
    sampled = run_strategy(model, prompt_ids, sampled_strategy, drafters.get(DRAFTER_KIND.get(sampled_strategy)),
                           args.max_new_tokens, temperature=args.temperature, seed=0)
    print(f"\nsampled ({sampled_strategy}, temperature {args.temperature}, seed 0): "
          f"{sampled['tokens_per_s']:.1f} tok/s, tau {sampled['tau']:.2f}")
    print(highlighted(model.tokenizer, sampled["tokens"], sampled["from_draft"], color))
    print(f"\ndemo took {time.perf_counter() - started:.1f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"model": args.model, "prompt": prompt, "greedy": rows, "sampled": sampled}, fh, indent=1)
    return 0 if all(row["identical"] for row in rows.values()) else 1


def format_table(rows: dict, max_new_tokens: int) -> str:
    lines = [f"greedy, {max_new_tokens} new tokens",
             f"{'strategy':<16}{'tokens/s':>10}{'tau':>7}{'speedup':>9}  identical to autoregressive"]
    for name, row in rows.items():
        lines.append(f"{name:<16}{row['tokens_per_s']:>10.1f}{row['tau']:>7.2f}{row['speedup']:>8.2f}x  "
                     f"{'yes' if row['identical'] else 'NO'}")
    return "\n".join(lines)
