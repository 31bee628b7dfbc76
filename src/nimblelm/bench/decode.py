"""``nimblelm bench decode``: greedy batch-1 decoding speed of nimblelm vs transformers.

For each size a random ``LlamaForCausalLM`` (fp32, weights Normal(0, 0.02), tied embeddings)
is built, converted with :func:`nimblelm.integrations.hf.from_hf`, and both generate the same
number of tokens after the same random prompt: HF ``generate(do_sample=False)`` and
``nl.generate(model, ...)``, interleaved, one warm-up each, median over ``--repeats``.
Both must produce the same tokens.

Decoding one token at batch 1 reads every weight once, so the memory-bandwidth bound is
``copy bandwidth / weight bytes per token`` (the LM head matrix counted once, tied or not;
the embedding lookup reads one row). Bandwidth is the best of several large ``dst.copy_(src)``
calls, counting read + write bytes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

from .report import loadavg, machine_info, run_and_report

# name -> LlamaConfig fields. All sizes tie the embeddings (LM head = embedding matrix).
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),  # smoke tests only
    "14m": dict(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=4),  # 14.49M parameters
    "110m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12),  # 109.53M parameters
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nimblelm bench decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="write every measured number to FILE")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine (after one warm-up)")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens generated per run")
    parser.add_argument("--prompt-len", type=int, default=128, help="random prompt length")
    parser.add_argument("--sizes", default="14m,110m", help=f"comma-separated, from: {', '.join(SIZES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bandwidth-mb", type=int, default=512, help="buffer size of the copy-bandwidth test")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = run_and_report(run_decode_bench, format_table, args)
    if results is None:
        return 2
    mismatched = [r["size"] for r in results["runs"] if not r["tokens_match"]]
    if mismatched:
        print(f"error: nimblelm and transformers generated different tokens for {', '.join(mismatched)}",
              file=sys.stderr)
        return 1
    return 0


def run_decode_bench(args: argparse.Namespace | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run the suite; ``args`` is a parsed namespace or None (then ``kwargs`` override the
    defaults, e.g. ``run_decode_bench(sizes="tiny", new_tokens=8)``). Returns the JSON dict."""
    if args is None:
        args = build_parser().parse_args([])
    options = {**vars(args), **kwargs}
    sizes = [s.strip().lower() for s in str(options["sizes"]).split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or not sizes:
        raise ValueError(f"unknown size(s) {unknown or sizes}; choose from {', '.join(SIZES)}")
    for name in ("repeats", "new_tokens", "prompt_len", "bandwidth_mb"):
        if options[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {options[name]}")
    if options.get("threads"):
        torch.set_num_threads(options["threads"])
    torch.set_flush_denormal(True)
    results: dict[str, Any] = {"machine": machine_info(), "settings": {k: options[k] for k in
                               ("repeats", "new_tokens", "prompt_len", "seed")} | {"sizes": sizes}}
    before = measure_copy_bandwidth(options["bandwidth_mb"])
    results["runs"] = [bench_size(name, options) for name in sizes]
    after = measure_copy_bandwidth(options["bandwidth_mb"])  # twice: a busy machine slows one of them
    best = max(before, after, key=lambda b: b["best_gb_s"])
    results["bandwidth"] = {**best, "before_gb_s": before["best_gb_s"], "after_gb_s": after["best_gb_s"]}
    for run in results["runs"]:
        add_bound(run, best["best_gb_s"])
    results["machine"]["loadavg_end"] = loadavg()
    return results


# -- measurements ----------------------------------------------------------------------------------
def measure_copy_bandwidth(megabytes: int = 512, trials: int = 7) -> dict[str, Any]:
    """Best ``dst.copy_(src)`` rate over ``trials``, counting bytes read + written (GB = 1e9 B)."""
    src = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    seconds = []
    for _ in range(trials):
        start = time.perf_counter()
        dst.copy_(src)
        seconds.append(time.perf_counter() - start)
    moved = 2 * src.numel() * src.element_size()
    return {"buffer_mb": megabytes, "trials": trials, "seconds": seconds,
            "best_gb_s": moved / min(seconds) / 1e9, "median_gb_s": moved / statistics.median(seconds) / 1e9}


def build_models(name: str, seed: int, context: int):
    """A random fp32 LlamaForCausalLM of size ``name`` and its nimblelm conversion."""
    import transformers

    from ..integrations.hf import from_hf

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**SIZES[name], tie_word_embeddings=True, max_position_embeddings=context,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf_model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for param in hf_model.parameters():
            if param.dim() >= 2:  # norms keep their weight of 1
                param.normal_(0.0, 0.02)
    return hf_model, from_hf(hf_model)


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one batch-1 decode step reads: every parameter once, except that the
    embedding lookup reads one row (a tied LM head reads the whole matrix, counted once)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.embed.weight
    if model.lm_head is not None:  # untied: the embedding matrix is not read, only one row
        total -= embed.numel() * embed.element_size() - embed.shape[1] * embed.element_size()
    return total


def kv_bytes_per_token(model, context: int) -> int:
    """KV-cache bytes one decode step reads at ``context`` cached tokens."""
    cfg = model.config
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context * model.embed.weight.element_size()


def _time_hf(hf_model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, list[int]]:
    """(wall seconds, process CPU seconds, new tokens) of one HF greedy generate call."""
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    return time.perf_counter() - start, time.process_time() - cpu, out[0, prompt.shape[1]:].tolist()


def _time_nimble(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, list[int], dict]:
    import nimblelm as nl

    start, cpu = time.perf_counter(), time.process_time()
    res = nl.generate(model, prompt, max_new_tokens=new_tokens)
    return time.perf_counter() - start, time.process_time() - cpu, res.tokens[0].tolist(), res.stats.as_dict()


def _time_hf_prefill(hf_model, prompt: torch.Tensor, repeats: int) -> float:
    seconds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with torch.no_grad():
            hf_model(prompt, use_cache=True, logits_to_keep=1)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:])


def bench_size(name: str, options: dict[str, Any]) -> dict[str, Any]:
    new_tokens, prompt_len, repeats = options["new_tokens"], options["prompt_len"], options["repeats"]
    hf_model, model = build_models(name, options["seed"], context=max(2048, prompt_len + new_tokens))
    prompt = torch.randint(0, SIZES[name]["vocab_size"], (1, prompt_len),
                           generator=torch.Generator().manual_seed(options["seed"] + 1))
    print(f"[{name}] {model.num_parameters() / 1e6:.2f}M parameters: warm-up", file=sys.stderr, flush=True)
    *_, hf_tokens = _time_hf(hf_model, prompt, new_tokens)
    _, _, nl_tokens, _ = _time_nimble(model, prompt, new_tokens)
    deterministic = True
    hf_s, nl_s, hf_cpu, nl_cpu, nl_stats = [], [], [], [], []
    for r in range(repeats):  # interleaved, so drifting machine load hits both engines alike
        seconds, cpu, tokens = _time_hf(hf_model, prompt, new_tokens)
        hf_s.append(seconds)
        hf_cpu.append(cpu)
        deterministic &= tokens == hf_tokens
        seconds, cpu, tokens, stats = _time_nimble(model, prompt, new_tokens)
        deterministic &= tokens == nl_tokens
        nl_s.append(seconds)
        nl_cpu.append(cpu)
        nl_stats.append(stats)
        print(f"[{name}] repeat {r + 1}/{repeats}: transformers {new_tokens / hf_s[-1]:.1f} tok/s, "
              f"nimblelm {new_tokens / nl_s[-1]:.1f} tok/s", file=sys.stderr, flush=True)
    hf_prefill = _time_hf_prefill(hf_model, prompt, repeats)
    summary = _summarise(name, model, new_tokens, prompt_len, hf_s, nl_s, nl_stats, hf_prefill, hf_tokens, nl_tokens)
    summary.update(hf_cpu_seconds=hf_cpu, nimblelm_cpu_seconds=nl_cpu,  # process CPU time, all threads
                   repeats_identical=deterministic)
    summary["tokens_match"] = summary["tokens_match"] and deterministic
    return summary


def _summarise(name, model, new_tokens, prompt_len, hf_s, nl_s, nl_stats, hf_prefill,
               hf_tokens, nl_tokens) -> dict[str, Any]:
    hf_med, nl_med = statistics.median(hf_s), statistics.median(nl_s)
    nl_prefill = statistics.median(s["prefill_s"] for s in nl_stats)
    nl_decode = (new_tokens - 1) / (nl_med - nl_prefill)  # the prefill call yields the first token
    hf_decode = (new_tokens - 1) / (hf_med - hf_prefill)
    mean_context = prompt_len + new_tokens / 2
    first_diff = next((i for i, (a, b) in enumerate(zip(hf_tokens, nl_tokens)) if a != b), None)
    return {
        "size": name, "parameters": model.num_parameters(), "tied_embeddings": model.config.tie_embeddings,
        "config": {k: v for k, v in model.config.to_dict().items() if k in (
            "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")},
        "hf_seconds": hf_s, "nimblelm_seconds": nl_s,
        "hf_tokens_per_s": new_tokens / hf_med, "nimblelm_tokens_per_s": new_tokens / nl_med,
        "speedup": hf_med / nl_med,
        "hf_prefill_s": hf_prefill, "nimblelm_prefill_s": nl_prefill,
        "hf_decode_tokens_per_s": hf_decode, "nimblelm_decode_tokens_per_s": nl_decode,
        "weight_bytes_per_token": weight_bytes_per_token(model),
        "kv_bytes_per_token_mean": kv_bytes_per_token(model, int(mean_context)),
        "tokens_match": hf_tokens == nl_tokens, "first_mismatch": first_diff, "nimblelm_stats": nl_stats,
    }


def add_bound(run: dict[str, Any], bandwidth_gb_s: float) -> None:
    """Memory-bandwidth bound of one size's run, and the fraction of it each engine reaches
    in decoding (prefill excluded); the variant with KV reads adds the mean cache size."""
    weights, kv = run["weight_bytes_per_token"], run["kv_bytes_per_token_mean"]
    bound = bandwidth_gb_s * 1e9 / weights
    run.update(bandwidth_gb_s=bandwidth_gb_s, bound_tokens_per_s=bound,
               nimblelm_fraction_of_bound=run["nimblelm_decode_tokens_per_s"] / bound,
               hf_fraction_of_bound=run["hf_decode_tokens_per_s"] / bound,
               bound_with_kv_tokens_per_s=bandwidth_gb_s * 1e9 / (weights + kv))


# -- reporting -------------------------------------------------------------------------------------
def format_table(results: dict[str, Any]) -> str:
    m, bw = results["machine"], results["bandwidth"]
    lines = [f"CPU: {m['cpu_model']} | torch threads {m['torch_threads']} | load {m['loadavg_start']}",
             f"copy bandwidth (read+write, best of {bw['trials']}, before/after the runs): "
             f"{bw['before_gb_s']:.1f} / {bw['after_gb_s']:.1f} GB/s; the bound uses {bw['best_gb_s']:.1f}",
             f"greedy, fp32, batch 1, prompt {results['settings']['prompt_len']}, "
             f"{results['settings']['new_tokens']} new tokens, median of {results['settings']['repeats']}",
             "",
             f"{'size':>6} {'params':>8} {'HF tok/s':>9} {'nl tok/s':>9} {'nl/HF':>6} {'HF dec':>7} {'nl dec':>7}"
             f" {'MB/tok':>7} {'bound':>7} {'nl/bound':>8} {'same':>5}"]
    for r in results["runs"]:
        lines.append(f"{r['size']:>6} {r['parameters'] / 1e6:>7.1f}M {r['hf_tokens_per_s']:>9.1f} "
                     f"{r['nimblelm_tokens_per_s']:>9.1f} {r['speedup']:>6.2f} {r['hf_decode_tokens_per_s']:>7.1f} "
                     f"{r['nimblelm_decode_tokens_per_s']:>7.1f} {r['weight_bytes_per_token'] / 1e6:>7.1f} "
                     f"{r['bound_tokens_per_s']:>7.1f} {r['nimblelm_fraction_of_bound']:>8.0%} "
                     f"{'yes' if r['tokens_match'] else 'NO':>5}")
    lines.append("tok/s: new tokens / wall time incl. prefill; dec: decode only (prefill timed apart); "
                 "bound: bandwidth / weight bytes per token")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
