"""Batched unit-lower-triangular solves ``(I + L) X = R``: the core of the delta rule's
chunkwise (WY / UT) form, one [C, C] system per chunk and head.

:func:`unit_lower_solve` runs the native kernel (``nimblelm/native/triangular.c``: forward
substitution vectorised across the right-hand sides, 3-5x LAPACK's per-matrix trsm here) for
float32 / float64 CPU tensors when it could be built, with a backward through the transposed
solve; otherwise ``torch.linalg.solve_triangular``, the oracle the tests hold the kernel to.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..native.calls import checked_library, even_ranges, int64s, ptr, run_split

__all__ = ["unit_lower_solve", "reference_unit_lower_solve"]

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_ABI = 2  # must equal nl_triangular_abi() in triangular.c
_FUNCTIONS = [f"{name}_{sfx}" for sfx in _SUFFIX.values()
              for name in ("nl_unit_lower_solve", "nl_unit_lower_solve_transposed")]


def _library():
    return checked_library("triangular", _ABI, _FUNCTIONS)


def reference_unit_lower_solve(L: Tensor, rhs: Tensor) -> Tensor:
    """``torch.linalg.solve_triangular`` form of :func:`unit_lower_solve` (reads only L's
    strictly lower triangle, like the kernel)."""
    return torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)


def _solve(L: Tensor, R: Tensor, transposed: bool) -> Tensor:
    """(I + L)^-1 R, or (I + L)^-T R, as a new tensor; L [n, C, C], R [n, C, W], contiguous."""
    n, C, W = R.shape
    X = torch.empty_like(R)
    name = "nl_unit_lower_solve_transposed" if transposed else "nl_unit_lower_solve"
    kernel = getattr(_library(), f"{name}_{_SUFFIX[X.dtype]}")
    args = [ptr(L), ptr(R), ptr(X)] + int64s(C, W)
    run_split(kernel, lambda i: args, even_ranges(n), "unit_lower_solve")
    return X


class _NativeUnitLowerSolve(torch.autograd.Function):
    """(L [n, C, C], rhs [n, C, W]) -> X [n, C, W]; both inputs contiguous, one dtype."""

    @staticmethod
    def forward(ctx, L, rhs):
        X = _solve(L, rhs, transposed=False)
        ctx.save_for_backward(L, X)
        return X

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_X):
        L, X = ctx.saved_tensors
        grad_rhs = _solve(L, grad_X.contiguous(), transposed=True)  # (I + L)^-T dX
        grad_L = None
        if ctx.needs_input_grad[0]:  # d/dL of (I + L)^-1 R: -(I + L)^-T dX X^T, strictly lower
            grad_L = -(grad_rhs @ X.transpose(-1, -2)).tril(-1)
        return grad_L, grad_rhs


def _native_ok(L: Tensor, rhs: Tensor) -> bool:
    return (L.device.type == "cpu" and rhs.device.type == "cpu" and L.dtype == rhs.dtype
            and L.dtype in _SUFFIX and _library() is not None)


def unit_lower_solve(L: Tensor, rhs: Tensor) -> Tensor:
    """X with ``(I + L) X = rhs``, for L [..., C, C] strictly lower (its diagonal and upper
    triangle are ignored) and rhs [..., C, W]; batch dimensions broadcast. Differentiable in
    both (L's gradient is strictly lower)."""
    if L.dim() < 2 or L.shape[-1] != L.shape[-2] or rhs.dim() < 2 or rhs.shape[-2] != L.shape[-1]:
        raise ValueError(f"unit_lower_solve needs L [..., C, C] and rhs [..., C, W]; got "
                         f"{tuple(L.shape)} and {tuple(rhs.shape)}")
    if not _native_ok(L, rhs) or rhs.shape[-1] == 0 or rhs.shape[-2] == 0:
        return reference_unit_lower_solve(L, rhs)
    batch = torch.broadcast_shapes(L.shape[:-2], rhs.shape[:-2])
    C, W = rhs.shape[-2:]
    L_flat = L.expand(*batch, C, C).reshape(-1, C, C).contiguous()
    rhs_flat = rhs.expand(*batch, C, W).reshape(-1, C, W).contiguous()
    return _NativeUnitLowerSolve.apply(L_flat, rhs_flat).reshape(*batch, C, W)
