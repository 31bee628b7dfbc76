"""Activations with faster CPU forms than PyTorch's.

``gelu_tanh`` is GELU's tanh approximation, ``F.gelu(x, approximate="tanh")``, computed through
the identity 0.5 (1 + tanh(z)) = sigmoid(2 z): on this CPU build ``tanh`` (and the tanh GELU)
run at a third of ``sigmoid``'s speed (7.8 vs 2.3 ms on [2048, 1024] fp32, one thread), and
the sigmoid form takes 4.5 ms. It agrees with PyTorch's to a few float32 ulps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

GELU_C = math.sqrt(2.0 / math.pi)
_A, _B = 2.0 * GELU_C, 2.0 * GELU_C * 0.044715  # sigmoid argument: x (A + B x^2)


def gelu_tanh(x: Tensor) -> Tensor:
    """x * sigmoid(2 c (x + 0.044715 x^3)), c = sqrt(2/pi): GELU's tanh approximation, any
    shape. With autograd it is PyTorch's own op (the fast form overwrites its temporaries)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return F.gelu(x, approximate="tanh")
    u = x * x
    u.mul_(_B).add_(_A).mul_(x)
    return torch.sigmoid_(u).mul_(x)


def gelu_tanh_and_grad(x: Tensor) -> tuple[Tensor, Tensor]:
    """(gelu_tanh(x), its derivative), sharing one sigmoid s = sigmoid(2z):
    gelu = x s and gelu' = s + 2 x s (1 - s) dz/dx, z = c (x + 0.044715 x^3). Differentiable."""
    xx = x * x
    s = torch.sigmoid(x * (xx * _B + _A))
    dz = xx * (3 * GELU_C * 0.044715) + GELU_C  # dz / dx
    return x * s, torch.addcmul(s, x * s * (1 - s), dz, value=2.0)
