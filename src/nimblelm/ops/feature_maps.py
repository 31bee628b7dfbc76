"""Feature maps phi for linear attention: pure functions on [..., D] tensors.

Linear attention replaces exp(q.k) by a kernel phi(q).phi(k); each map below states its
kernel. Feed phi(q), phi(k) to `nimblelm.ops.gla` (usually with normalize=True, scale=1.0).

    identity            phi(x) = x                          kernel q.k
    elu_plus_one        phi(x) = elu(x) + 1                 (Katharopoulos et al. 2020)
    taylor_first_order  phi(x) = [1, x / |x|]               1 + cos(q, k)  (Li et al. 2020)
    taylor_second_order phi(x) = [1, x / d^(1/4), x_i x_j (i <= j) scaled]
                                 1 + q.k / sqrt(d) + (q.k)^2 / (2 d)   (Based)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .native_scan import native_inference_ok, native_taylor2_forward

__all__ = ["identity", "elu_plus_one", "taylor_first_order", "taylor_second_order",
           "reference_taylor_second_order", "feature_dim"]


def identity(x: Tensor) -> Tensor:
    """phi(x) = x, [..., D] -> [..., D]."""
    return x


def elu_plus_one(x: Tensor) -> Tensor:
    """phi(x) = elu(x) + 1 > 0, [..., D] -> [..., D]."""
    return F.elu(x) + 1.0


def taylor_first_order(x: Tensor, normalize: bool = True, eps: float = 1e-6) -> Tensor:
    """First-order Taylor map of Li et al. 2020, [..., D] -> [..., 1 + D].

    phi(x) = [1, x_hat] with x_hat = x / max(|x|, eps) (L2-normalised; normalize=False
    keeps x as is), so phi(q).phi(k) = 1 + q_hat.k_hat, which is >= 0 when normalised.
    """
    if normalize:
        x = F.normalize(x, p=2.0, dim=-1, eps=eps)
    return torch.cat([torch.ones_like(x[..., :1]), x], dim=-1)  # [..., 1+D]


def taylor_second_order(x: Tensor) -> Tensor:
    """Second-order Taylor map of Based, [..., D] -> [..., 1 + D + D(D+1)/2].

    phi(q).phi(k) = 1 + q.k / sqrt(D) + (q.k)^2 / (2 D), the Taylor expansion of
    exp(q.k / sqrt(D)) to second order (always > 0: 1 + u + u^2/2 > 0). The quadratic part
    keeps each unordered pair once: (q.k)^2 = sum_i q_i^2 k_i^2 + 2 sum_{i<j} q_i q_j k_i k_j,
    so the features are x_i^2 / sqrt(2D) and x_i x_j / sqrt(D) (i < j), 1.8x fewer than
    the full outer product at D = 16 (the same kernel; flash-linear-attention does the same).
    """
    if native_inference_ok(x):  # inference: one native pass (the expression below is its oracle)
        return native_taylor2_forward(x)
    return reference_taylor_second_order(x)


def reference_taylor_second_order(x: Tensor) -> Tensor:
    """`taylor_second_order` in PyTorch (differentiable; the native kernel's oracle)."""
    d = x.shape[-1]
    rows, cols = torch.triu_indices(d, d, device=x.device)  # i <= j, row-major
    coef = torch.full(rows.shape, d ** -0.5, dtype=x.dtype, device=x.device)  # [D(D+1)/2]
    coef[rows == cols] = (2.0 * d) ** -0.5
    flat = x.reshape(-1, d)  # index_select on a 2-d tensor: 5x faster than x[..., rows] here
    second = flat.index_select(1, rows) * (flat.index_select(1, cols) * coef)  # [n, D(D+1)/2]
    out = torch.cat([torch.ones_like(flat[:, :1]), flat * d ** -0.25, second], dim=-1)
    return out.view(*x.shape[:-1], out.shape[-1])  # [..., 1 + D + D(D+1)/2]


def feature_dim(name: str, head_dim: int) -> int:
    """Size of phi(x) for a map named by its function name and an input size head_dim."""
    sizes = {"identity": head_dim, "elu_plus_one": head_dim,
             "taylor_first_order": 1 + head_dim,
             "taylor_second_order": 1 + head_dim + head_dim * (head_dim + 1) // 2}
    if name not in sizes:
        raise ValueError(f"unknown feature map {name!r}; choose one of {sorted(sizes)}")
    return sizes[name]
