"""``nimblelm bench mixers`` against transformers: Mamba, Mamba-2 and RecurrentGemma (RG-LRU).

For each, a random fp32 HF model (``MambaForCausalLM`` / ``Mamba2ForCausalLM`` /
``RecurrentGemmaForCausalLM`` with only recurrent blocks; ``--hf-layers`` layers, the bench's
hidden size, vocabulary 1024, HF's own initialisation) is converted with
:func:`nimblelm.integrations.hf.from_hf`, the logits of both are compared, and both are timed
in the same run, interleaved, median of ``--repeats`` after one warm-up each:

* prefill: one full forward (no cache, logits of the last position only) at each ``--hf-lengths``;
* decode: after a cached prefill of ``--hf-context`` tokens, ``--decode-steps`` one-token
  forwards with the cache (HF: its own cache object; nimblelm: ``make_cache``).

``ratio`` = nimblelm time / HF time (below 1: nimblelm is faster). transformers runs its pure
PyTorch fallbacks on CPU (no ``mamba_ssm`` / ``causal_conv1d`` kernels): sequential scans for
Mamba and RecurrentGemma, the chunked SSD form for Mamba-2.

RecurrentGemma with only recurrent blocks is driven with explicit ``position_ids``, a
``DynamicCache`` and ``attention_mask={"sliding_attention": None}``: its mask builder otherwise
asks the cache for a sequence length, which transformers 5 refuses without attention layers.
"""

from __future__ import annotations

import importlib
import statistics
import sys
import time
from typing import Any, Callable

import torch

HF_MODELS = ["mamba", "mamba2", "rglru"]
VOCAB = 1024
_NO_MASK = {"sliding_attention": None}  # recurrent-only RecurrentGemma: skip the mask builder


def hf_model(name: str, opts: dict[str, Any], transformers) -> torch.nn.Module:
    """A random fp32 transformers model of the bench's size for mixer ``name``."""
    hidden, layers, quick = opts["hidden_size"], opts["hf_layers"], opts["quick"]
    torch.manual_seed(opts["seed"])
    if name == "mamba":
        config = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                          state_size=16, expand=2, conv_kernel=4)
        return transformers.MambaForCausalLM(config).float().eval()
    if name == "mamba2":
        head_dim = 16 if quick else 64
        config = transformers.Mamba2Config(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                           state_size=16 if quick else 64, expand=2, head_dim=head_dim,
                                           num_heads=2 * hidden // head_dim, n_groups=1, conv_kernel=4,
                                           chunk_size=opts["chunk_size"])
        return transformers.Mamba2ForCausalLM(config).float().eval()
    config = transformers.RecurrentGemmaConfig(
        vocab_size=VOCAB, hidden_size=hidden, lru_width=hidden, num_hidden_layers=layers,
        num_attention_heads=opts["num_heads"], intermediate_size=4 * hidden, block_types=["recurrent"],
        attention_window_size=opts["window"])
    return transformers.RecurrentGemmaForCausalLM(config).float().eval()


class HFDriver:
    """Prefill / cached decode of a transformers recurrent LM, one API for the three models."""

    def __init__(self, name: str, model: torch.nn.Module, transformers):
        from ..integrations.hf import cache_keyword, returned_cache

        self.returned_cache = returned_cache
        self.model, self.gemma, self.transformers = model, name == "rglru", transformers
        self.cache, self.length = None, 0
        self.keyword = cache_keyword(model)  # "cache" from transformers 5.25 on

    def _call(self, tokens: torch.Tensor, use_cache: bool, keep: int):
        kwargs: dict[str, Any] = dict(use_cache=use_cache, logits_to_keep=keep)
        if self.gemma:
            n = tokens.shape[1]
            kwargs.update(position_ids=torch.arange(self.length, self.length + n)[None], attention_mask=_NO_MASK)
            if use_cache:
                kwargs[self.keyword] = self.cache
        elif use_cache and self.cache is not None:
            kwargs[self.keyword] = self.cache
        return self.model(tokens, **kwargs)

    def logits(self, tokens: torch.Tensor, keep: int = 1) -> torch.Tensor:
        self.cache, self.length = None, 0
        return self._call(tokens, False, keep).logits

    def start(self, tokens: torch.Tensor) -> torch.Tensor:
        self.cache, self.length = None, 0
        if self.gemma:  # fresh recurrent states (as the model does itself when given no cache)
            self.model.model._setup_cache(self.model.config, 1, tokens.device, torch.float32)
            self.cache = self.transformers.DynamicCache(config=self.model.config)
        out = self._call(tokens, True, 1)
        self.cache = self.cache if self.gemma else self.returned_cache(out)
        self.length = tokens.shape[1]
        return out.logits

    def step(self, token: torch.Tensor) -> torch.Tensor:
        out = self._call(token, True, 1)
        self.cache = self.cache if self.gemma else self.returned_cache(out)
        self.length += 1
        return out.logits


class NimbleDriver:
    """The same API over a nimblelm LanguageModel."""

    def __init__(self, model: torch.nn.Module, max_len: int):
        self.model, self.max_len, self.cache = model, max_len, None

    def logits(self, tokens: torch.Tensor, keep: int = 1) -> torch.Tensor:
        return self.model(tokens, logits_to_keep=keep).logits

    def start(self, tokens: torch.Tensor) -> torch.Tensor:
        self.cache = self.model.make_cache(1, self.max_len)
        return self.model(tokens, cache=self.cache, logits_to_keep=1).logits

    def step(self, token: torch.Tensor) -> torch.Tensor:
        return self.model(token, cache=self.cache).logits


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """One warm-up of each, then ``repeats`` rounds timing each once (drifting load hits all)."""
    seconds: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for key, fn in fns.items():
                start = time.perf_counter()
                fn()
                seconds[key].append(time.perf_counter() - start)
    return seconds


def _tokens(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed + length))


def _decode(hf: HFDriver, ours: NimbleDriver, opts: dict[str, Any]) -> dict[str, Any]:
    """Per-token decode after a cached prefill of ``hf_context`` tokens, steps interleaved."""
    context, steps = opts["hf_context"], opts["decode_steps"]
    tokens = _tokens(context + steps + 1, opts["seed"] + 7)
    times: dict[str, list[float]] = {"hf": [], "nimblelm": []}
    with torch.no_grad():
        hf.start(tokens[:, :context]), ours.start(tokens[:, :context])
        last = {"hf": hf.step(tokens[:, context:context + 1]), "nimblelm": ours.step(tokens[:, context:context + 1])}
        for i in range(context + 1, context + 1 + steps):
            for key, driver in (("hf", hf), ("nimblelm", ours)):
                start = time.perf_counter()
                last[key] = driver.step(tokens[:, i:i + 1])
                times[key].append(time.perf_counter() - start)
    hf_s, nl_s = statistics.median(times["hf"]), statistics.median(times["nimblelm"])
    return {"context": context, "steps": steps, "hf_per_token_s": hf_s, "nimblelm_per_token_s": nl_s,
            "ratio": nl_s / hf_s, "hf_steps_s": times["hf"], "nimblelm_steps_s": times["nimblelm"],
            "max_abs_logit_diff_last_step": float((last["hf"][:, -1] - last["nimblelm"][:, -1]).abs().max())}


def bench_hf_model(name: str, opts: dict[str, Any], transformers) -> dict[str, Any]:
    """One HF model vs its conversion; a converter that is missing becomes a ``note``."""
    from ..integrations.hf import from_hf

    row: dict[str, Any] = {"model": name}
    print(f"[hf {name}] building", file=sys.stderr, flush=True)
    try:
        model = hf_model(name, opts, transformers)
        row.update(hf_class=type(model).__name__, parameters=sum(p.numel() for p in model.parameters()))
        try:
            ours = from_hf(model)
        except NotImplementedError as exc:
            row["note"] = f"from_hf cannot convert {type(model).__name__} yet: {exc}"
            return row
        max_len = max(opts["hf_lengths"] + [opts["hf_context"] + opts["decode_steps"] + 2])
        hf, nl = HFDriver(name, model, transformers), NimbleDriver(ours, max_len)
        check = _tokens(min(opts["hf_lengths"]), opts["seed"])
        with torch.no_grad():
            row["max_abs_logit_diff"] = float((hf.logits(check, 0) - nl.logits(check, 0)).abs().max())
        row["prefill"] = []
        for length in opts["hf_lengths"]:
            print(f"[hf {name}] prefill T={length}", file=sys.stderr, flush=True)
            tokens = _tokens(length, opts["seed"])
            s = _interleaved({"hf": lambda: hf.logits(tokens), "nimblelm": lambda: nl.logits(tokens)}, opts["repeats"])
            hf_s, nl_s = statistics.median(s["hf"]), statistics.median(s["nimblelm"])
            row["prefill"].append({"T": length, "hf_s": hf_s, "nimblelm_s": nl_s, "ratio": nl_s / hf_s,
                                   "hf_runs": s["hf"], "nimblelm_runs": s["nimblelm"]})
        print(f"[hf {name}] decode", file=sys.stderr, flush=True)
        row["decode"] = _decode(hf, nl, opts)
    except Exception as exc:  # noqa: BLE001  (report and go on with the other models)
        row["error"] = f"{type(exc).__name__}: {exc}"
        print(f"[hf {name}] ERROR {row['error']}", file=sys.stderr, flush=True)
    return row


def compare_with_transformers(opts: dict[str, Any]) -> dict[str, Any]:
    """The ``hf`` section of the results: settings and one run per selected HF model."""
    chosen = [m for m in HF_MODELS if m in opts["mixers"]]
    if not chosen:
        return {"skipped": f"none of {', '.join(HF_MODELS)} selected"}
    try:
        import transformers
    except ImportError:
        return {"skipped": "transformers is not installed"}
    notes = []
    try:  # the recurrent converters register themselves with from_hf on import
        importlib.import_module("nimblelm.integrations.hf_recurrent")
    except ImportError as exc:
        notes.append(f"nimblelm.integrations.hf_recurrent not importable: {exc}")
    settings = {k: opts[k] for k in ("hidden_size", "hf_layers", "hf_lengths", "hf_context", "decode_steps",
                                     "repeats")} | {"vocab_size": VOCAB, "transformers": transformers.__version__}
    return {"settings": settings, "notes": notes, "runs": [bench_hf_model(m, opts, transformers) for m in chosen]}


def format_hf_table(hf: dict[str, Any]) -> list[str]:
    if "runs" not in hf:
        return [f"VS TRANSFORMERS: skipped ({hf.get('skipped')})"]
    s = hf["settings"]
    lines = [f"VS TRANSFORMERS {s['transformers']} (full models: {s['hf_layers']} layer(s), hidden {s['hidden_size']}, "
             f"vocab {s['vocab_size']}; ratio = nimblelm / HF time, < 1 = nimblelm faster)",
             f"{'model':>8} {'what':>16} {'HF ms':>9} {'nl ms':>9} {'ratio':>7} {'max|dlogit|':>12}"]
    for row in hf["runs"]:
        if row.get("note") or row.get("error"):
            lines.append(f"{row['model']:>8} {row.get('note') or 'ERROR ' + row['error']}")
            continue
        for e in row.get("prefill", []):
            lines.append(f"{row['model']:>8} {'prefill T=' + str(e['T']):>16} {e['hf_s'] * 1e3:>9.1f}"
                         f" {e['nimblelm_s'] * 1e3:>9.1f} {e['ratio']:>7.2f} {row['max_abs_logit_diff']:>12.1e}")
        d = row.get("decode")
        if d:
            what = f"decode @{d['context']}/tok"
            lines.append(f"{row['model']:>8} {what:>16} {d['hf_per_token_s'] * 1e3:>9.2f}"
                         f" {d['nimblelm_per_token_s'] * 1e3:>9.2f} {d['ratio']:>7.2f}"
                         f" {d['max_abs_logit_diff_last_step']:>12.1e}")
    lines += hf.get("notes", [])
    return lines
