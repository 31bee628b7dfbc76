"""``nimblelm bench mixers``: every sequence mixer's forms, one layer at a time, on CPU.

Each mixer of :data:`nimblelm.layers.registry.MIXERS` is built as ONE layer (fp32, batch 1,
``--hidden-size`` 256 with head size 64, ``--chunk-size`` 64; Mamba N=16, Mamba-2 N=64 and
head size 64, local attention window ``--window``) and timed under ``torch.no_grad``, median
of ``--repeats`` runs after one warm-up:

* **prefill** at each ``--lengths`` T: the fast form (``layer.sequence_forward`` for recurrent
  mixers, the layer forward for attention) against two naive baselines on the same input:
  ``loop``, the layer's own one-token form run token by token (``layer.step``; for attention
  a forward with a KV cache per token), and ``naive op``, the ops-level oracle loop
  (``naive_gla``, ``naive_selective_scan``, ``naive_linear_recurrence``, ``naive_delta_rule``,
  ``naive_causal_conv1d``) against the ops-level fast form on the same projected op inputs
  (projections excluded). A naive run whose linear extrapolation from the largest measured
  T exceeds ``--naive-budget`` seconds is skipped and its estimate reported with a ``~``.
  ``max|fast-loop|`` checks that fast form and loop agree.
* **decode**: per-token time of one step (``layer.step``; attention: a forward of one token
  with a KV cache) after a prefill of each ``--decode-contexts`` C tokens, and the state
  bytes per sequence at that context (``RecurrentState.nbytes`` / ``KVState.nbytes`` of a
  cache of C slots; local attention also shows its window bound).
* **FLOP/s** of the chunkwise op, FLOPs counted analytically (see :func:`chunk_flops`),
  against the machine's fp32 matmul rate (N x N @ N x N, N = 1024): the op's best run against
  the matmul's best of 10, and the medians against each other.
* **vs transformers** (mamba, mamba2, rglru; :mod:`nimblelm.bench.mixers_hf`): HF's CPU
  implementation and its :func:`~nimblelm.integrations.hf.from_hf` conversion, full models,
  prefill and per-token decode with cache, time ratio nimblelm / HF.

Prints one table per measurement and writes every number to ``--json`` (plus a PNG next to
it when matplotlib is importable). ``--quick`` shrinks everything to run in seconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable

import torch

from .report import loadavg, machine_info, run_and_report

from .. import layers  # noqa: F401  (registers every mixer)
from ..cache import Cache, ForwardInfo
from ..layers.recurrent import RecurrentMixer
from ..layers.registry import MIXERS
from ..layers.rotary import inverse_frequencies, rope_cos_sin
from ..models.config import ModelConfig
from . import mixers_ops

ORDER = ["attention", "local_attention", "linear_attn", "based", "retnet", "gla", "mamba", "mamba2", "rglru",
         "deltanet", "gated_deltanet", "short_conv", "ttt_linear", "ttt_mlp"]
DEFAULTS = dict(hidden_size=256, lengths="256,1024,4096", decode_contexts="256,4096", chunk_size=64, window=512,
                repeats=3, decode_steps=16, naive_budget=20.0, matmul_size=1024, hf_lengths="256,1024,2048",
                hf_layers=2, hf_context=256)
QUICK = dict(hidden_size=64, lengths="16,48", decode_contexts="16,48", chunk_size=16, window=16, repeats=1,
             decode_steps=3, naive_budget=5.0, matmul_size=256, hf_lengths="24", hf_layers=1, hf_context=12)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nimblelm bench mixers", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="FILE", help="write every measured number to FILE (and a PNG beside it)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (runs in seconds; the smoke test)")
    p.add_argument("--mixers", default=None, help="comma-separated mixer names (default: all registered)")
    p.add_argument("--lengths", default=None, help=f"prefill lengths T (default {DEFAULTS['lengths']})")
    p.add_argument("--decode-contexts", default=None, help=f"decode contexts (default {DEFAULTS['decode_contexts']})")
    p.add_argument("--hidden-size", type=int, default=None, help="hidden size (default 256; 512 for a larger layer)")
    p.add_argument("--chunk-size", type=int, default=None, help="chunk size of the chunkwise forms (default 64)")
    p.add_argument("--window", type=int, default=None, help="local attention window (default 512)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs after one warm-up (default 3)")
    p.add_argument("--decode-steps", type=int, default=None, help="timed decode steps per context (default 16)")
    p.add_argument("--naive-budget", type=float, default=None, help="skip a naive run estimated longer (s, default 20)")
    p.add_argument("--matmul-size", type=int, default=None, help="N of the reference N x N matmul (default 1024)")
    p.add_argument("--hf-lengths", default=None,
                   help=f"prefill lengths vs transformers (default {DEFAULTS['hf_lengths']})")
    p.add_argument("--hf-layers", type=int, default=None, help="layers of the transformers models (default 2)")
    p.add_argument("--hf-context", type=int, default=None, help="context before timing decode vs transformers (256)")
    p.add_argument("--no-hf", action="store_true", help="skip the comparison with transformers")
    p.add_argument("--plot", metavar="FILE", help="PNG path (default: the --json path with .png)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's; --quick: 1)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = run_and_report(run_mixers_bench, format_tables, args)
    if results is None:
        return 2
    if results.get("plot"):
        print(f"plot: {results['plot']}")
    failed = [r["mixer"] for r in results["mixers"] if r.get("error")]
    failed += [r["model"] for r in results["hf"].get("runs", []) if r.get("error")]
    if failed:
        print(f"error: {', '.join(failed)} failed (see the 'error' fields)", file=sys.stderr)
        return 1
    return 0


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"--{name} needs positive integers, got {text!r}")
    return sorted(set(values))


def resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    """Parsed arguments + the defaults of the chosen mode, validated."""
    base = QUICK if args.quick else DEFAULTS
    opts = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in base.items()}
    for name in ("lengths", "decode_contexts", "hf_lengths"):
        opts[name] = _ints(opts[name], name.replace("_", "-"))
    for name in ("hidden_size", "chunk_size", "window", "repeats", "decode_steps", "matmul_size", "hf_layers",
                 "hf_context"):
        if opts[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {opts[name]}")
    heads = max(1, opts["hidden_size"] // (16 if args.quick else 64))
    if opts["hidden_size"] % heads:
        raise ValueError(f"--hidden-size {opts['hidden_size']} must be a multiple of the head size")
    registered = [m for m in ORDER if m in MIXERS] + sorted(set(MIXERS) - set(ORDER))
    chosen = [m.strip() for m in args.mixers.split(",") if m.strip()] if args.mixers else registered
    unknown = [m for m in chosen if m not in MIXERS]
    if unknown or not chosen:
        raise ValueError(f"unknown mixer(s) {unknown or chosen}; registered: {', '.join(registered)}")
    opts.update(mixers=chosen, num_heads=heads, quick=bool(args.quick), seed=args.seed, no_hf=args.no_hf)
    return opts


def run_mixers_bench(args: argparse.Namespace | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run the suite; ``args`` is a parsed namespace or None (then ``kwargs`` override the
    parser defaults, e.g. ``run_mixers_bench(quick=True, mixers="gla")``). Returns the JSON dict."""
    if args is None:
        args = build_parser().parse_args([])
    args = argparse.Namespace(**{**vars(args), **kwargs})
    opts = resolve_options(args)
    threads_before = torch.get_num_threads()
    threads = args.threads or (1 if args.quick else None)  # quick: no thread contention on a busy machine
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(args, opts)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, opts: dict[str, Any]) -> dict[str, Any]:
    torch.set_flush_denormal(True)
    results: dict[str, Any] = {"machine": machine_info(), "settings": dict(opts)}
    results["matmul"] = measure_matmul(opts["matmul_size"])
    results["mixers"] = [bench_mixer(name, opts, results["matmul"]) for name in opts["mixers"]]
    if opts["no_hf"]:
        results["hf"] = {"skipped": "--no-hf"}
    else:
        from . import mixers_hf

        results["hf"] = mixers_hf.compare_with_transformers(opts)
    results["machine"]["loadavg_end"] = loadavg()
    results["plot"] = write_plot(results, args.plot or (args.json and _png_path(args.json)))
    return results


# -- timing ----------------------------------------------------------------------------------------
def time_call(fn: Callable[[], Any], repeats: int, warmup: Callable[[], Any] | None = None,
              budget: float | None = None) -> dict[str, Any]:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up (``warmup`` or ``fn``).
    With ``budget`` (seconds), runs after the first are dropped when they would not fit."""
    with torch.no_grad():
        (warmup or fn)()
        seconds, out = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn()
            seconds.append(time.perf_counter() - start)
            if budget is not None and sum(seconds) + seconds[0] > budget:
                break
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "seconds": seconds, "output": out}


def measure_matmul(n: int = 1024, trials: int = 10) -> dict[str, Any]:
    """Best fp32 ``[n, n] @ [n, n]`` rate over ``trials`` (2 n^3 FLOPs each)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    a @ b
    seconds = []
    for _ in range(trials):
        start = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - start)
    flops = 2 * n ** 3
    return {"n": n, "trials": trials, "seconds": seconds, "best_gflop_s": flops / min(seconds) / 1e9,
            "median_gflop_s": flops / statistics.median(seconds) / 1e9}


# -- one layer -------------------------------------------------------------------------------------
def mixer_config(name: str, opts: dict[str, Any]) -> ModelConfig:
    """The ModelConfig one ``name`` layer is built from (shared sizes + per-mixer choices)."""
    quick = opts["quick"]
    fields: dict[str, Any] = dict(hidden_size=opts["hidden_size"], num_heads=opts["num_heads"],
                                  chunk_size=opts["chunk_size"], sliding_window=opts["window"],
                                  max_seq_len=max(opts["lengths"] + opts["decode_contexts"]) + 64)
    if name == "mamba2":
        fields.update(state_size=16 if quick else 64, extra={"mamba_head_dim": 16 if quick else 64})
    return ModelConfig(**fields)


class LayerRunner:
    """The forms of one layer behind one interface: ``prefill(x)`` (fast form), ``loop(x)``
    (one token at a time), ``decode_setup(x)`` + ``decode_step(x_t)``, ``state_bytes(context)``."""

    def __init__(self, layer: torch.nn.Module, config: ModelConfig, max_len: int):
        self.layer, self.recurrent = layer, isinstance(layer, RecurrentMixer)
        self.uses_rope = getattr(layer, "uses_rope", False)
        positions = torch.arange(max_len)[None]  # [1, max_len]
        self.positions = positions
        if self.uses_rope:
            inv_freq = inverse_frequencies(config.rotary_dim, config.rope_theta)
            self.cos, self.sin = rope_cos_sin(positions, inv_freq, torch.float32)  # [1, 1, max_len, D]
        self.cache = self.state = None

    def _info(self, start: int, n: int, cache: Cache | None) -> ForwardInfo:
        positions = self.positions[:, start:start + n]
        info = cache.prepare(positions) if cache is not None else ForwardInfo(positions=positions,
                                                                             key_positions=positions)
        if self.uses_rope:
            info.cos, info.sin = self.cos[:, :, start:start + n], self.sin[:, :, start:start + n]
        return info

    def prefill(self, x: torch.Tensor):
        if self.recurrent:
            return self.layer.sequence_forward(x, None, self.positions[:, :x.shape[1]])
        return self.layer(x, self._info(0, x.shape[1], None))

    def _new_cache(self, max_len: int) -> Cache:
        return Cache([self.layer.init_state(1, max_len, x_device(self.layer), torch.float32)], 1, max_len,
                     x_device(self.layer))

    def loop(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        if self.recurrent:
            state = self.layer.init_state(1, length, x_device(self.layer), torch.float32).tensors
            outs = []
            for t in range(length):
                y, state = self.layer.step(x[:, t:t + 1], state, self.positions[:, t:t + 1])
                outs.append(y)
            return torch.cat(outs, 1)
        cache = self._new_cache(length)
        outs = []
        for t in range(length):
            outs.append(self.layer(x[:, t:t + 1], self._info(t, 1, cache), cache.states[0])[0])
            cache.commit()
        return torch.cat(outs, 1)

    def decode_setup(self, x: torch.Tensor, extra_slots: int) -> None:
        """Prefill ``x`` [1, C, hidden] (the context) with the fast form, keeping the state."""
        self.length = x.shape[1]
        if self.recurrent:
            self.state = self.layer.sequence_forward(x, None, self.positions[:, :self.length])[1]
            return
        self.cache = self._new_cache(self.length + extra_slots)
        self.layer(x, self._info(0, self.length, self.cache), self.cache.states[0])
        self.cache.commit()

    def decode_step(self, x_t: torch.Tensor) -> torch.Tensor:
        t = self.length
        self.length += 1
        if self.recurrent:
            y, self.state = self.layer.step(x_t, self.state, self.positions[:, t:t + 1])
            return y
        y = self.layer(x_t, self._info(t, 1, self.cache), self.cache.states[0])[0]
        self.cache.commit()
        return y

    def state_bytes(self, context: int) -> int:
        return self.layer.init_state(1, context, x_device(self.layer), torch.float32).nbytes()


def x_device(layer: torch.nn.Module) -> torch.device:
    return next(layer.parameters()).device


def bench_mixer(name: str, opts: dict[str, Any], matmul: dict[str, Any]) -> dict[str, Any]:
    """All measurements of one mixer; an exception becomes the row's ``error``."""
    row: dict[str, Any] = {"mixer": name}
    print(f"[{name}] building", file=sys.stderr, flush=True)
    try:
        config = mixer_config(name, opts)
        torch.manual_seed(opts["seed"])
        layer = MIXERS[name](config, 0).float().eval()
        row.update(kind="recurrent" if isinstance(layer, RecurrentMixer) else "attention",
                   parameters=sum(p.numel() for p in layer.parameters()),
                   config={k: v for k, v in config.to_dict().items() if k in (
                       "hidden_size", "num_heads", "head_dim", "chunk_size", "state_size", "expand", "conv_size",
                       "sliding_window", "extra")})
        runner = LayerRunner(layer, config, config.max_seq_len)
        row["prefill"] = bench_prefill(name, runner, opts, matmul)
        row["decode"] = bench_decode(name, runner, opts)
    except Exception as exc:  # noqa: BLE001  (one broken mixer must not hide the others)
        row["error"] = f"{type(exc).__name__}: {exc}"
        print(f"[{name}] ERROR {row['error']}", file=sys.stderr, flush=True)
    return row


def _inputs(length: int, hidden: int, seed: int) -> torch.Tensor:
    return torch.randn(1, length, hidden, generator=torch.Generator().manual_seed(seed + length))


def _budgeted(label: str, fn: Callable, warmup: Callable, length: int, per_token: float | None,
              opts: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
    """Time a naive form unless its estimate (``per_token`` s x ``length``) exceeds the budget;
    with more than one torch thread also at one thread, keeping the faster (both medians are
    in the entry). Returns (entry, the per-token seconds to extrapolate from next)."""
    budget = opts["naive_budget"]
    if per_token is not None and per_token * length > budget:
        return {"estimated_s": per_token * length, "skipped": f"{label}: estimated {per_token * length:.1f} s > "
                f"--naive-budget {budget:g} s (linear extrapolation from a shorter T)"}, per_token
    timed = time_call(fn, opts["repeats"], warmup=warmup, budget=budget)
    threads = torch.get_num_threads()
    if threads > 1:  # a loop of tiny ops can be slower on more threads: the baseline is its faster run
        torch.set_num_threads(1)
        try:
            single = time_call(fn, opts["repeats"], warmup=warmup, budget=budget)
        finally:
            torch.set_num_threads(threads)
        timed.update(median_s_at_threads=timed["median_s"], median_s_1_thread=single["median_s"], threads_used=threads)
        if single["median_s"] < timed["median_s"]:
            timed.update(median_s=single["median_s"], min_s=single["min_s"], seconds=single["seconds"], threads_used=1)
    return timed, timed["median_s"] / length


def bench_prefill(name: str, runner: LayerRunner, opts: dict[str, Any],
                  matmul: dict[str, Any]) -> list[dict[str, Any]]:
    rows, loop_pt, op_pt = [], None, None
    for length in opts["lengths"]:
        print(f"[{name}] prefill T={length}", file=sys.stderr, flush=True)
        x = _inputs(length, opts["hidden_size"], opts["seed"])
        short = x[:, :min(length, 8)]
        fast = time_call(lambda: runner.prefill(x), opts["repeats"])
        loop, loop_pt = _budgeted("loop", lambda: runner.loop(x), lambda: runner.loop(short), length, loop_pt, opts)
        entry = {"T": length, "fast_s": fast["median_s"], "fast_runs": fast["seconds"],
                 "loop_s": loop.get("median_s"), "loop_runs": loop.get("seconds"),
                 "loop_threads": loop.get("threads_used"), "loop_s_1_thread": loop.get("median_s_1_thread"),
                 "loop_estimated_s": loop.get("estimated_s"), "loop_note": loop.get("skipped")}
        if "output" in loop:
            entry["max_abs_fast_minus_loop"] = float((fast["output"][0] - loop["output"]).abs().max())
        ref = entry["loop_s"] or entry["loop_estimated_s"]
        entry["loop_speedup"] = ref / entry["fast_s"] if ref else None
        with torch.no_grad():
            forms = mixers_ops.op_forms(runner.layer, x, runner.positions[:, :length])
        if forms is None:
            entry["op_note"] = "no ops-level naive form for this mixer"
        else:
            op_pt = _bench_op(entry, forms, length, op_pt, opts, matmul)
        rows.append(entry)
    return rows


def _bench_op(entry: dict[str, Any], forms: mixers_ops.OpForms, length: int, per_token: float | None,
              opts: dict[str, Any], matmul: dict[str, Any]) -> float | None:
    """Fill the ops-level columns of ``entry``: fast op vs naive op, achieved GFLOP/s. The
    fraction of the matmul rate compares like with like: the op's best run against the
    matmul's best (``op_fraction_of_matmul``), and medians against medians."""
    fast = time_call(forms.fast, opts["repeats"])
    naive, per_token = _budgeted("naive op", forms.naive, forms.naive_warmup, length, per_token, opts)
    entry.update(op_family=forms.family, op_fast=forms.fast_name, op_naive=forms.naive_name,
                 op_fast_s=fast["median_s"], op_fast_min_s=fast["min_s"], op_naive_s=naive.get("median_s"),
                 op_naive_threads=naive.get("threads_used"), op_naive_s_1_thread=naive.get("median_s_1_thread"),
                 op_naive_estimated_s=naive.get("estimated_s"), op_note=naive.get("skipped"))
    ref = entry["op_naive_s"] or entry["op_naive_estimated_s"]
    entry["op_speedup"] = ref / entry["op_fast_s"] if ref else None
    if "output" in naive:
        entry["op_max_abs_fast_minus_naive"] = float((fast["output"][0] - naive["output"][0]).abs().max())
    if forms.flops is not None:
        best, median = forms.flops / fast["min_s"] / 1e9, forms.flops / fast["median_s"] / 1e9
        entry.update(op_flops=forms.flops, op_flops_formula=forms.flops_formula, op_gflop_s=best,
                     op_gflop_s_median=median, op_fraction_of_matmul=best / matmul["best_gflop_s"],
                     op_fraction_of_matmul_median=median / matmul["median_gflop_s"])
    return per_token


def bench_decode(name: str, runner: LayerRunner, opts: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    steps = opts["decode_steps"]
    for context in opts["decode_contexts"]:
        print(f"[{name}] decode at context {context}", file=sys.stderr, flush=True)
        x = _inputs(context + steps + 1, opts["hidden_size"], opts["seed"] + 1)
        seconds = []
        with torch.no_grad():
            runner.decode_setup(x[:, :context], extra_slots=steps + 1)
            runner.decode_step(x[:, context:context + 1])  # warm-up
            for i in range(context + 1, context + 1 + steps):
                start = time.perf_counter()
                runner.decode_step(x[:, i:i + 1])
                seconds.append(time.perf_counter() - start)
        entry = {"context": context, "per_token_s": statistics.median(seconds), "min_s": min(seconds),
                 "steps": seconds, "state_bytes": runner.state_bytes(context)}
        if name == "local_attention":
            window = runner.layer.window
            entry["state_bytes_window_bound"] = runner.state_bytes(min(context, window))
        rows.append(entry)
    runner.cache = runner.state = None
    return rows


# -- reporting -------------------------------------------------------------------------------------
def _ms(seconds: float | None, estimated: float | None = None) -> str:
    if seconds is None and estimated is None:
        return "-"
    value = (seconds if seconds is not None else estimated) * 1e3
    text = f"{value:.3g}" if value < 1000 else f"{value:.0f}"
    return text if seconds is not None else "~" + text


def _x(value: float | None, estimated: bool = False) -> str:
    return "-" if value is None else ("~" if estimated else "") + f"{value:.3g}x"


def _bytes(n: int) -> str:
    for unit, size in (("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _prefill_table(results: dict[str, Any]) -> list[str]:
    lines = ["PREFILL (ms, median): fast = chunkwise/parallel layer form; loop = layer one token at a time; "
             "op columns = ops only (projections excluded)",
             f"{'mixer':>15} {'T':>5} {'fast':>8} {'loop':>9} {'loop/fast':>9} {'chunk op':>9} {'naive op':>9}"
             f" {'naive/op':>9} {'max|fast-loop|':>14}"]
    for row in results["mixers"]:
        for e in row.get("prefill", []):
            diff = e.get("max_abs_fast_minus_loop")
            diff_text = "-" if diff is None else f"{diff:.1e}"
            lines.append(
                f"{row['mixer']:>15} {e['T']:>5} {_ms(e['fast_s']):>8} {_ms(e['loop_s'], e['loop_estimated_s']):>9}"
                f" {_x(e['loop_speedup'], e['loop_s'] is None):>9} {_ms(e.get('op_fast_s')):>9}"
                f" {_ms(e.get('op_naive_s'), e.get('op_naive_estimated_s')):>9}"
                f" {_x(e.get('op_speedup'), e.get('op_naive_s') is None):>9} {diff_text:>14}")
    lines.append("~ = not run: estimated by linear extrapolation from the largest T measured (over --naive-budget)")
    if results["machine"].get("torch_threads", 1) > 1:
        lines.append("loop and naive op: the faster of their runs at --threads and at 1 thread (both in the JSON)")
    return lines


def _decode_table(results: dict[str, Any]) -> list[str]:
    contexts = results["settings"]["decode_contexts"]
    head = "".join(f" {'ms@' + str(c):>9}" for c in contexts)
    head += "".join(f" {'state@' + str(c):>12}" for c in contexts)
    lines = ["DECODE: ms per token (median of one-token steps after a prefill of the context); "
             "state bytes per sequence",
             f"{'mixer':>15}{head} {'last/first':>10}"]
    for row in results["mixers"]:
        d = row.get("decode")
        if not d:
            continue
        times = "".join(f" {_ms(e['per_token_s']):>9}" for e in d)
        states = "".join(f" {_bytes(e['state_bytes']):>12}" for e in d)
        lines.append(f"{row['mixer']:>15}{times}{states} {d[-1]['per_token_s'] / d[0]['per_token_s']:>9.2f}x")
        if "state_bytes_window_bound" in d[-1]:
            lines.append(f"{'':>15} (window-bounded KV would need {_bytes(d[-1]['state_bytes_window_bound'])}; "
                         "the cache keeps every slot)")
    return lines


def _flops_table(results: dict[str, Any]) -> list[str]:
    mm = results["matmul"]
    lines = [f"CHUNKWISE OP FLOP/s vs fp32 matmul {mm['n']}^3: best {mm['best_gflop_s']:.1f}, median "
             f"{mm['median_gflop_s']:.1f} GFLOP/s ({mm['trials']} runs); op: best and median of its runs",
             f"{'mixer':>15} {'T':>5} {'op':>18} {'GFLOP':>8} {'best ms':>8} {'GFLOP/s':>8} {'of matmul':>9}"
             f" {'median/median':>13}"]
    for row in results["mixers"]:
        for e in row.get("prefill", []):
            if e.get("op_gflop_s") is not None:
                lines.append(f"{row['mixer']:>15} {e['T']:>5} {e['op_fast']:>18} {e['op_flops'] / 1e9:>8.3g}"
                             f" {_ms(e['op_fast_min_s']):>8} {e['op_gflop_s']:>8.2f} {e['op_fraction_of_matmul']:>9.1%}"
                             f" {e['op_fraction_of_matmul_median']:>13.1%}")
    lines.append("FLOPs: matmul FLOPs of the chunk form as computed (dense C x C blocks); see mixers_ops.chunk_flops")
    return lines


def format_tables(results: dict[str, Any]) -> str:
    m, s = results["machine"], results["settings"]
    load = {k: "n/a" if m.get(k) is None else " ".join(f"{v:.2f}" for v in m[k])
            for k in ("loadavg_start", "loadavg_end")}
    lines = [f"CPU: {m['cpu_model']} | torch {m['torch']} threads {m['torch_threads']} | load (1/5/15 min) at start "
             f"{load['loadavg_start']}, end {load['loadavg_end']}",
             f"one layer, fp32, batch 1, hidden {s['hidden_size']}, {s['num_heads']} heads, chunk {s['chunk_size']}, "
             f"window {s['window']}, median of {s['repeats']} after 1 warm-up, no_grad", ""]
    start, end = (m.get("loadavg_start") or [0])[0], (m.get("loadavg_end") or [0])[0]
    if start > 1.0 or end > m["torch_threads"] + 1.0:  # at the end, our own threads count too
        lines[-1:-1] = [f"WARNING: 1-min load average {start:.1f} at start, {end:.1f} at end on {m.get('cpu_count')} "
                        "CPUs: other processes share the cores, these timings are unreliable"]
    lines += _prefill_table(results) + [""] + _decode_table(results) + [""] + _flops_table(results)
    errors = [f"{r['mixer']}: {r['error']}" for r in results["mixers"] if r.get("error")]
    if errors:
        lines += ["", "ERRORS:"] + errors
    from .mixers_hf import format_hf_table

    lines += [""] + format_hf_table(results["hf"])
    if isinstance(results.get("plot"), str) and results["plot"].startswith("skipped"):
        lines.append(f"plot {results['plot']}")
    return "\n".join(lines)


def _png_path(json_path: str) -> str:
    return (json_path[:-5] if json_path.endswith(".json") else json_path) + ".png"


def write_plot(results: dict[str, Any], path: str | None) -> str | None:
    """Prefill time vs T and decode time vs context per mixer (log-log), when matplotlib is
    importable. Returns the path written, a 'skipped: ...' note, or None without a path."""
    if not path:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib is not installed"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    for row in results["mixers"]:
        if row.get("prefill"):
            ax1.plot([e["T"] for e in row["prefill"]], [e["fast_s"] * 1e3 for e in row["prefill"]], "o-",
                     label=row["mixer"])
        if row.get("decode"):
            ax2.plot([e["context"] for e in row["decode"]], [e["per_token_s"] * 1e3 for e in row["decode"]], "o-",
                     label=row["mixer"])
    for ax, title, xlabel in ((ax1, "prefill, fast form", "T"), (ax2, "decode, one token", "context")):
        ax.set(xscale="log", yscale="log", title=title, xlabel=xlabel, ylabel="ms")
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
