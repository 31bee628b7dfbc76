"""Cross-entropy of a linear head without the [M, V] logits.

``linear_cross_entropy(hidden, weight, targets)`` equals
``F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)`` (mean over the rows whose
target is not ignored), but works through the rows a block at a time: each block's logits
[R, V] are computed into one reused buffer, turned into the loss and (when autograd needs it)
at once into the gradient ``softmax - onehot``, which is multiplied back into the gradients of
hidden and weight before the next block. The logits of all rows never exist together.
``linear_soft_cross_entropy(hidden, weight, probs)`` is the same against target distributions
(distillation: the gradient is ``softmax - probs``), and also returns each row's argmax.

Why: on CPU, ``F.cross_entropy`` over [1024, 8192] float32 logits (MQAR's labelled positions;
32 MiB) streams the logits through memory several times (log-softmax, its backward, the
matmul gradients), and glibc maps every block of 32 MiB or more fresh from the OS, so each such
tensor is page-faulted in again. A block of R rows stays in cache.

The gradients are computed in the forward pass (as Liger-Kernel's fused linear cross-entropy
does; only for the inputs that require them) and scaled by the incoming gradient in the
backward pass, so the head's matmuls run as often as in the unfused form.

Shapes: hidden [M, D], weight [V, D], targets [M] (int64). The loss is a 0-d tensor, float64
for float64 inputs (computed entirely in float64), else float32: float32 inputs compute in
float32, lower precisions compute the logits in their own dtype and the softmax in float32
(as ``F.cross_entropy(logits.float(), ...)``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["linear_cross_entropy", "reference_linear_cross_entropy", "linear_soft_cross_entropy",
           "reference_linear_soft_cross_entropy", "at_least_float32", "IGNORE_INDEX", "BLOCK_ELEMENTS"]

IGNORE_INDEX = -100
BLOCK_ELEMENTS = 1 << 21  # logits per block (8 MiB in float32): R = BLOCK_ELEMENTS // V rows


def at_least_float32(logits: Tensor) -> Tensor:
    """``logits`` in float32 unless they are float32 or float64 already (where softmaxes run)."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype of the fused forms' softmax, gradients and loss: float64 for float64 inputs."""
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def reference_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor,
                                   ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The unfused form, the oracle: ``F.cross_entropy(hidden @ weight.T, targets)``, the logits
    in float32 unless they are float32 or float64 already."""
    return torch.nn.functional.cross_entropy(at_least_float32(hidden @ weight.t()), targets,
                                             ignore_index=ignore_index)


def _check(hidden: Tensor, weight: Tensor, targets: Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy needs hidden [M, D] and weight [V, D]; got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 of shape [M] = {tuple(hidden.shape[:1])}, got "
                         f"{targets.dtype} {tuple(targets.shape)}")


def _spans(M: int, rows: int) -> list[slice]:
    return [slice(start, min(M, start + rows)) for start in range(0, M, rows)]


class _HardTargets:
    """Integer targets [M] with ``ignore_index`` rows left out of the mean."""

    def __init__(self, targets: Tensor, ignore_index: int, V: int):
        keep = targets != ignore_index
        bad = keep & ((targets < 0) | (targets >= V))
        if bool(bad.any()):
            raise ValueError(f"target {int(targets[bad][0])} is outside the vocabulary [0, {V}) "
                             f"(use {ignore_index} for positions without a target)")
        self.keep, self.idx = keep, targets.clamp(0, V - 1)[:, None]  # ignored rows read a real column
        self.inv = 1.0 / max(int(keep.sum()), 1)  # every kept row's weight in the mean

    def block(self, rows: slice, z: Tensor) -> tuple[Tensor, Tensor, None]:
        """(z at each row's target, row weights (0 where ignored), mass None: 1) of a block."""
        return z.gather(1, self.idx[rows])[:, 0], self.keep[rows].to(z.dtype) * self.inv, None

    def subtract(self, rows: slice, grad: Tensor, row_w: Tensor) -> None:
        grad.scatter_add_(1, self.idx[rows], -row_w[:, None])  # - onehot, weighted

    def spans(self, M: int, rows: int) -> list[slice]:
        return _spans(M, rows)


class _SoftTargets:
    """Target distributions [M, V], or [B, n, V] for M = B * n rows (any strides along B and n:
    blocks stay inside one batch row and read it as a view, so a slice like probs[:, 1:] is
    never copied). Rows need not be normalised: the loss is sum_v -p_v log q_v."""

    def __init__(self, probs: Tensor, M: int):
        self.probs, self.inv = probs, 1.0 / max(M, 1)

    def spans(self, M: int, rows: int) -> list[slice]:
        """Blocks of at most ``rows`` rows that never cross a batch row of [B, n, V] probs."""
        if self.probs.dim() == 2:
            return _spans(M, rows)
        n = self.probs.shape[1]
        return [slice(b * n + i, b * n + min(n, i + rows)) for b in range(self.probs.shape[0])
                for i in range(0, n, rows)]

    def _rows(self, rows: slice) -> Tensor:  # a view: blocks lie inside one batch row
        if self.probs.dim() == 2:
            return self.probs[rows]
        b, i = divmod(rows.start, self.probs.shape[1])
        return self.probs[b, i:i + rows.stop - rows.start]

    def block(self, rows: slice, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(sum_v p_v z_v, row weights, mass sum_v p_v) of a block."""
        self.current = self._rows(rows).to(z.dtype)  # [R, V], reused by subtract
        return (self.current * z).sum(1), torch.full((z.shape[0],), self.inv, dtype=z.dtype), self.current.sum(1)

    def subtract(self, rows: slice, grad: Tensor, row_w: Tensor) -> None:
        grad.add_(self.current, alpha=-self.inv)


def _blocks(hidden: Tensor, weight: Tensor, targets, want_h: bool, want_w: bool,
            rows: int) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """(mean loss, d loss / d hidden or None, d loss / d weight or None, argmax of each row's
    logits [M]), block by block. targets: `_HardTargets` or `_SoftTargets`. Per row the loss
    is mass * lse(z) - picked (picked = z[target], or sum_v p_v z_v with mass = sum_v p_v), its
    gradient w.r.t. z mass * softmax(z) - onehot (or - p)."""
    M, V = hidden.shape[0], weight.shape[0]
    weight_t = weight.t()  # [D, V]
    acc = _compute_dtype(hidden)
    total = torch.zeros((), dtype=torch.float64)
    grad_h = torch.empty_like(hidden) if want_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
    argmax = torch.empty(M, dtype=torch.int64, device=hidden.device)
    buf = torch.empty(min(rows, M), V, dtype=hidden.dtype, device=hidden.device)
    for sl in targets.spans(M, rows):
        h = hidden[sl]
        R = h.shape[0]
        logits = torch.mm(h, weight_t, out=buf[:R])  # [R, V]
        z = logits if logits.dtype == acc else logits.to(acc)
        picked, row_w, mass = targets.block(sl, z)  # [R] each (mass None: 1)
        top, argmax[sl] = z.max(1)  # [R]
        p = z.sub_(top[:, None]).exp_()  # [R, V] unnormalised probabilities (in place)
        s = p.sum(1)  # [R]
        lse = top + s.log()
        total += (((lse if mass is None else lse * mass) - picked) * row_w).sum(dtype=torch.float64)
        if want_h or want_w:
            p.mul_((row_w / s if mass is None else row_w * mass / s)[:, None])  # softmax, weighted
            targets.subtract(sl, p, row_w)  # d loss / d logits
            if want_h:
                torch.mm(p if p.dtype == hidden.dtype else p.to(hidden.dtype), weight, out=grad_h[sl])  # [R, D]
            if want_w:
                grad_w.addmm_(p.t(), h.to(acc))  # [V, D]
    loss = total.to(acc)
    return loss, grad_h, (None if grad_w is None else grad_w.to(weight.dtype)), argmax


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, rows):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, grad_h, grad_w, argmax = _blocks(hidden, weight, targets, want_h, want_w, rows)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(argmax)
        return loss, argmax

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_argmax):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype),
                None if grad_w is None else grad_w * grad_loss.to(grad_w.dtype), None, None)


def _run(hidden: Tensor, weight: Tensor, targets, block_rows: int | None) -> tuple[Tensor, Tensor]:
    """(loss, argmax) of the fused form, through autograd when an input needs it."""
    rows = block_rows or max(1, BLOCK_ELEMENTS // max(1, weight.shape[0]))
    if hidden.shape[0] == 0:  # no rows: 0, still connected to both inputs for autograd
        zero = (hidden.sum() * 0 + weight.sum() * 0).to(_compute_dtype(hidden))
        return zero, torch.zeros(0, dtype=torch.int64)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden.contiguous(), weight, targets, rows)
    loss, _, _, argmax = _blocks(hidden, weight, targets, False, False, rows)
    return loss, argmax


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX,
                         block_rows: int | None = None, return_argmax: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Mean cross-entropy of the logits ``hidden @ weight.T`` against ``targets``, rows with
    ``targets == ignore_index`` left out (0 when every row is); see the module doc.
    block_rows: rows per block (default: about 8 MiB of float32 logits per block).
    return_argmax: also return each row's argmax of the logits [M] (no gradient), e.g. for accuracy."""
    _check(hidden, weight, targets)
    loss, argmax = _run(hidden, weight, _HardTargets(targets, ignore_index, weight.shape[0]), block_rows)
    return (loss, argmax) if return_argmax else loss


def linear_soft_cross_entropy(hidden: Tensor, weight: Tensor, probs: Tensor,
                              block_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """Distillation loss mean_rows(-sum_v probs_v log softmax(hidden @ weight.T)_v), blocked like
    `linear_cross_entropy`, and the argmax of every row's logits (no gradient; e.g. for the
    agreement with the teacher). hidden [M, D] and probs [M, V], or hidden [B, n, D] and probs
    [B, n, V] (read a block of rows at a time, so a strided view is never copied whole);
    weight [V, D]. Returns (loss, argmax [M] or [B, n])."""
    if hidden.dim() not in (2, 3) or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_soft_cross_entropy needs hidden [M, D] or [B, n, D] and weight [V, D]; got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if probs.shape != (*hidden.shape[:-1], weight.shape[0]):
        raise ValueError(f"probs must be {(*hidden.shape[:-1], weight.shape[0])} (hidden's rows x V), "
                         f"got {tuple(probs.shape)}")
    lead = hidden.shape[:-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    loss, argmax = _run(flat, weight, _SoftTargets(probs, flat.shape[0]), block_rows)
    return loss, argmax.reshape(lead)


def reference_linear_soft_cross_entropy(hidden: Tensor, weight: Tensor, probs: Tensor) -> Tensor:
    """The unfused form of `linear_soft_cross_entropy`'s loss (the oracle)."""
    logits = at_least_float32(hidden @ weight.t())
    return -(probs.to(logits.dtype) * logits.log_softmax(-1)).sum(-1).mean()
