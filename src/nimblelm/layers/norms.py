"""Output norms shared by the recurrent mixers, with a one-pass native form for inference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.native_scan import native_gated_rmsnorm, native_inference_ok


def gated_head_norm(norm: nn.RMSNorm, o: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """``norm(o) * silu(gate)`` per head: o [B, T, H, D] with ``norm`` over D; gate [B, T, H*D]
    (pre-activation) or None. Returns [B, T, H*D]. Without gradients one native pass
    (``native_gated_rmsnorm``) where it is built, else the PyTorch modules."""
    if norm.weight is not None and native_inference_ok(o, gate, norm.weight):
        eps = norm.eps if norm.eps is not None else torch.finfo(o.dtype).eps
        return native_gated_rmsnorm(o.flatten(2), norm.weight, eps, group=o.shape[-1], z=gate)
    y = norm(o)
    if gate is not None:
        y = y * F.silu(gate).view(o.shape)
    return y.flatten(2)
