"""Ops-level forms of each mixer for ``nimblelm bench mixers``: the layer's projected op
inputs, its fast op and naive (oracle loop) op on them, and the analytic FLOP count of the
chunkwise form.

FLOPs (:func:`chunk_flops`) count the matmuls of the chunk form as it computes them (dense
C x C blocks, masked afterwards), 2 FLOPs per multiply-add, per batch row, head and chunk;
elementwise work (decays, masks, feature maps, normalisers) is not counted:

* gated linear attention (``chunk_gla``: linear_attn, retnet, gla), key size
  Dk, value size Dv (+1 with the normaliser, which rides along as a value column):
  ``2 C^2 Dk`` (scores q k^T) + ``2 C^2 Dv`` (scores @ v) + ``2 C Dk Dv`` (the chunk's state
  contribution k^T v) + ``2 C Dk Dv`` (inter-chunk output q S) = ``2 C^2 (Dk + Dv) + 4 C Dk Dv``.
  C is the chunk size the op actually uses (shorter inputs get a smaller chunk). Chunks of the
  per-key-dim decay (gla) whose decay spans more than 60 in log space are recomputed in
  sub-chunks; that extra work is not counted.
* Based (``chunk_based``): the same with the scores from the raw q, k (size D) and the state
  in feature space (F = 1 + D + D(D+1)/2 rows), Dv counting the normaliser's column:
  ``2 C^2 (D + Dv) + 4 C F Dv``.
* SSD (``chunk_ssd``: mamba2), state size N, head size P, G groups of H/G heads sharing B
  and C: per group and chunk ``2 C^2 N`` (C B^T, once per group) + ``2 C^2 (H/G) P`` (scores
  @ x for all the group's heads at once) + ``4 C N (H/G) P`` (chunk state, inter-chunk
  output). Wide-decay chunks recomputed exactly are not counted.
* delta rule (``chunk_delta_rule``: deltanet, gated_deltanet): ``2 C^2 Dk`` (k k^T) +
  ``C^2 (Dk + Dv)`` (unit-triangular solve for [u, w]) + ``2 C^2 Dk`` (q k^T) + ``2 C^2 Dv``
  (attn @ d) + ``6 C Dk Dv`` (w S, q S, k^T d) = ``C^2 (5 Dk + 3 Dv) + 6 C Dk Dv``.
* selective scan / RG-LRU / short conv: elementwise scans, no matmul; TTT: not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..layers.deltanet import DeltaNet
from ..layers.linear_attention import BasedLinearAttention, LinearAttentionMixer
from ..layers.mamba import Mamba
from ..layers.mamba2 import Mamba2
from ..layers.rglru import RGLRUBlock
from ..layers.short_conv import ShortConv
from ..ops import based, delta, gla, native_scan, scan, short_conv, ssd

GLA_FORMULA = "B*H*ceil(T/C)*(2*C^2*(Dk+Dv) + 4*C*Dk*Dv)"
BASED_FORMULA = "B*H*ceil(T/C)*(2*C^2*(D+Dv) + 4*C*F*Dv), F = 1+D+D(D+1)/2"
DELTA_FORMULA = "B*H*ceil(T/C)*(C^2*(5*Dk+3*Dv) + 6*C*Dk*Dv)"
SSD_FORMULA = "B*G*ceil(T/C)*(2*C^2*N + 2*C^2*(H/G)*P + 4*C*N*(H/G)*P)"


@dataclass
class OpForms:
    family: str
    fast_name: str
    naive_name: str
    fast: Callable[[], Any]
    naive: Callable[[], Any]
    naive_warmup: Callable[[], Any]
    flops: int | None = None
    flops_formula: str | None = None


def gla_chunk_len(T: int, chunk_size: int, sub_chunk_size: int = gla.SUB_CHUNK) -> int:
    """The chunk length ``chunk_gla`` uses for T tokens (mirrors ``ops.gla._chunk_core``)."""
    sub = min(sub_chunk_size, chunk_size)
    return min(chunk_size, max(sub, math.ceil(T / sub) * sub))


def chunk_flops(family: str, B: int, T: int, H: int, Dk: int, Dv: int, chunk_size: int, groups: int = 1) -> int:
    """Matmul FLOPs of the chunk form of ``family`` ("gla", "ssd" or "delta"); module doc has
    the formulas. For "ssd" Dk is the state size N, Dv the head size P."""
    if family == "ssd":
        C = max(1, min(chunk_size, T))
        return B * groups * math.ceil(T / C) * (2 * C * C * Dk + 2 * C * C * (H // groups) * Dv
                                                + 4 * C * Dk * H * Dv // groups)
    if family == "gla":
        C = gla_chunk_len(T, chunk_size)
        return B * H * math.ceil(T / C) * (2 * C * C * (Dk + Dv) + 4 * C * Dk * Dv)
    if family == "based":  # Dk: the raw key size D; the state has F = 1 + D + D(D+1)/2 rows
        C, F = gla_chunk_len(T, chunk_size), 1 + Dk + Dk * (Dk + 1) // 2
        return B * H * math.ceil(T / C) * (2 * C * C * (Dk + Dv) + 4 * C * F * Dv)
    if family == "delta":
        C = max(1, min(chunk_size, T))
        return B * H * math.ceil(T / C) * (C * C * (5 * Dk + 3 * Dv) + 6 * C * Dk * Dv)
    raise ValueError(f"no FLOP formula for family {family!r}")


# -- op inputs of each layer family (x [1, T, hidden] -> the op's keyword arguments) ----------------
def _gla_inputs(layer, x, positions) -> dict:
    return layer._inputs(x)


def _ssd_inputs(layer, x, positions) -> dict:
    _, xBC, dt = layer._split(x)
    xBC, _ = short_conv.causal_conv1d(xBC, layer.conv_weight, layer.conv_bias, "silu")
    return dict(zip(("x", "dt", "A", "Bm", "Cm"), layer._ssd_parts(xBC, dt)))


def _scan_inputs(layer, x, positions) -> dict:
    u, z = layer.in_proj(x).chunk(2, dim=-1)
    u, _ = short_conv.causal_conv1d(u, layer.conv_weight, layer.conv_bias, "silu")
    return layer._scan_inputs(u, z)


def _rglru_inputs(layer, x, positions) -> dict:
    u, _ = short_conv.causal_conv1d(layer.linear_x(x), layer.conv_weight, layer.conv_bias, None)
    normalized, log_a = layer._gates(u, positions)
    return dict(x=normalized, log_a=log_a)


def _delta_inputs(layer, x, positions) -> dict:
    qkv, _ = short_conv.causal_conv1d(layer.qkv_proj(x), layer.conv_weight, None, "silu")
    return layer._rule_inputs(x, qkv)


def _conv_inputs(layer, x, positions) -> dict:
    return dict(x=x, weight=layer.conv_weight, bias=layer.conv_bias)


def _native_or(native_op: Callable, pytorch_op: Callable) -> Callable:
    """The op the layers run: the native kernel when built, else the PyTorch form (so the
    table names the one it timed)."""
    return native_op if native_scan.native_scan_available() else pytorch_op


# class -> (family, inputs builder, fast op, naive op, keyword arguments of the fast op only)
_FAMILIES: list[tuple[type, str, Callable, Callable, Callable, Callable[[Any], dict]]] = [
    (BasedLinearAttention, "based", lambda l, x, p: l.raw_inputs(x), based.chunk_based, based.naive_based,
     lambda l: {"chunk_size": l.chunk_size}),  # before its base class, LinearAttentionMixer
    (LinearAttentionMixer, "gla", _gla_inputs, gla.chunk_gla, gla.naive_gla, lambda l: {"chunk_size": l.chunk_size}),
    (Mamba2, "ssd", _ssd_inputs, ssd.chunk_ssd, ssd.naive_ssd, lambda l: {"chunk_size": l.chunk_size}),
    (Mamba, "selective_scan", _scan_inputs,
     _native_or(native_scan.native_selective_scan, scan.chunk_selective_scan), scan.naive_selective_scan,
     lambda l: {"chunk_size": l.chunk_size}),
    (RGLRUBlock, "linear_recurrence", _rglru_inputs,
     _native_or(native_scan.native_linear_recurrence, scan.scan_linear_recurrence), scan.naive_linear_recurrence,
     lambda l: {"chunk_size": l.chunk_size}),
    (DeltaNet, "delta", _delta_inputs, delta.chunk_delta_rule, delta.naive_delta_rule,
     lambda l: {"chunk_size": l.chunk_size}),
    (ShortConv, "short_conv", _conv_inputs, short_conv.causal_conv1d, short_conv.naive_causal_conv1d, lambda l: {}),
]


def _flops(family: str, inputs: dict, chunk_size: int) -> int | None:
    if family == "ssd":
        B, T, H, P = inputs["x"].shape
        _, _, G, N = inputs["Bm"].shape
        return chunk_flops("ssd", B, T, H, N, P, chunk_size, groups=G)
    if family not in ("gla", "based", "delta"):
        return None
    B, T, H, Dk = inputs["q"].shape
    Dv = inputs["v"].shape[-1] + (1 if inputs.get("normalize") or family == "based" else 0)
    return chunk_flops(family, B, T, H, Dk, Dv, chunk_size)


def _ttt_family(layer):
    """TTT-Linear / TTT-MLP layers (recognised by their ``dual_form`` op and ``_op_args``)."""
    from ..ops import ttt

    naive_op = getattr(ttt, "naive_" + layer.dual_form.__name__)
    return "ttt", lambda lay, x, positions: lay._op_args(x), layer.dual_form, naive_op, lambda lay: {}


def _family(layer: torch.nn.Module):
    for cls, *rest in _FAMILIES:
        if isinstance(layer, cls):
            return tuple(rest)
    if hasattr(layer, "dual_form") and hasattr(layer, "_op_args"):
        return _ttt_family(layer)
    return None


def op_forms(layer: torch.nn.Module, x: torch.Tensor, positions: torch.Tensor) -> OpForms | None:
    """The fast and naive op of ``layer``'s family on the op inputs of ``x`` [1, T, hidden]
    (computed once, outside the timed calls), or None for a mixer without an ops-level oracle."""
    found = _family(layer)
    if found is None:
        return None
    family, build, fast_op, naive_op, fast_kwargs = found
    inputs = build(layer, x, positions)
    short = build(layer, x[:, :8], positions[:, :8])
    extra = fast_kwargs(layer)
    flops = _flops(family, inputs, extra.get("chunk_size", 0))
    return OpForms(family=family, fast_name=fast_op.__name__, naive_name=naive_op.__name__,
                   fast=lambda: fast_op(**inputs, **extra, output_final_state=True),
                   naive=lambda: naive_op(**inputs, output_final_state=True),
                   naive_warmup=lambda: naive_op(**short, output_final_state=True), flops=flops,
                   flops_formula={"gla": GLA_FORMULA, "based": BASED_FORMULA, "ssd": SSD_FORMULA,
                                  "delta": DELTA_FORMULA}.get(family))
