"""Cross-entropy of a linear head without the [M, V] logits: ``linear_cross_entropy``.

``linear_cross_entropy(hidden, weight, targets)`` equals
``F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)`` (mean over the rows whose
target is not ignored), but works through the rows a block at a time: each block's logits
[R, V] are computed into one reused buffer, turned into the loss and (when autograd needs it)
at once into the gradient ``softmax - onehot``, which is multiplied back into the gradients of
hidden and weight before the next block. The logits of all rows never exist together.

Why: on CPU, ``F.cross_entropy`` over [1024, 8192] float32 logits (MQAR's labelled positions;
32 MiB) streams the logits through memory five times (log-softmax, its backward, the
matmul gradients), and glibc maps every block of 32 MiB or more fresh from the OS, so each such
tensor is page-faulted in again. A block of R rows stays in cache.

The gradients are computed in the forward pass (as Liger-Kernel's fused linear cross-entropy
does) and scaled by the incoming gradient in the backward pass, so the head's matmuls run
exactly as often as in the unfused form: one forward and two gradient products.

Shapes: hidden [M, D], weight [V, D], targets [M] (int64). Returns a 0-d tensor (float64 for
float64 inputs, else float32). Float32 and float64
are computed in their own dtype; lower precisions compute the logits in their own dtype and the softmax in
float32 (as ``F.cross_entropy(logits.float(), ...)``), float64 entirely in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["linear_cross_entropy", "reference_linear_cross_entropy", "IGNORE_INDEX", "BLOCK_ELEMENTS"]

IGNORE_INDEX = -100
BLOCK_ELEMENTS = 1 << 21  # logits per block (8 MiB in float32): R = BLOCK_ELEMENTS // V rows


def reference_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor,
                                   ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The unfused form, the oracle: ``F.cross_entropy(hidden @ weight.T, targets)``, the logits
    in float32 unless they are float32 or float64 already."""
    logits = hidden @ weight.t()
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index)


def _check(hidden: Tensor, weight: Tensor, targets: Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy needs hidden [M, D] and weight [V, D]; got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 of shape [M] = {tuple(hidden.shape[:1])}, got "
                         f"{targets.dtype} {tuple(targets.shape)}")


def _blocks(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, want_grads: bool,
            rows: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(mean loss, d loss / d hidden or None, d loss / d weight or None), block by block."""
    M, V = hidden.shape[0], weight.shape[0]
    keep = targets != ignore_index
    count = int(keep.sum())
    if count and bool(((targets[keep] < 0) | (targets[keep] >= V)).any()):
        bad = targets[keep][(targets[keep] < 0) | (targets[keep] >= V)][0]
        raise ValueError(f"target {int(bad)} is outside the vocabulary [0, {V}) "
                         f"(use {ignore_index} for positions without a target)")
    inv = 1.0 / max(count, 1)  # every row's weight in the mean (0 where ignored)
    weight_t = weight.t()  # [D, V]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # softmax / gradient dtype
    total = torch.zeros((), dtype=torch.float64)
    grad_h = torch.empty_like(hidden) if want_grads else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_grads else None
    buf = torch.empty(min(rows, M), V, dtype=hidden.dtype, device=hidden.device)
    for start in range(0, M, rows):
        h = hidden[start:start + rows]
        R = h.shape[0]
        t, k = targets[start:start + R], keep[start:start + R]
        logits = torch.mm(h, weight_t, out=buf[:R])  # [R, V]
        z = logits if logits.dtype == acc else logits.to(acc)
        idx = t.clamp(0, V - 1)[:, None]  # ignored rows read a real column, then weigh 0
        picked = z.gather(1, idx)[:, 0]  # [R]
        top = z.amax(1, keepdim=True)  # [R, 1]
        p = z.sub_(top).exp_()  # [R, V] unnormalised probabilities (in place)
        s = p.sum(1)  # [R]
        lse = top[:, 0] + s.log()
        total += ((lse - picked) * k).sum(dtype=torch.float64)
        if want_grads:
            row_w = (k.to(p.dtype) * inv)  # [R]
            p.mul_((row_w / s)[:, None])  # softmax, weighted
            p.scatter_add_(1, idx, -row_w[:, None])  # - onehot, weighted: d loss / d logits
            g = p if p.dtype == hidden.dtype else p.to(hidden.dtype)
            torch.mm(g, weight, out=grad_h[start:start + R])  # [R, D]
            grad_w.addmm_(p.t(), h.to(acc))  # [V, D]
    loss = (total * inv).to(acc)
    return loss, grad_h, (None if grad_w is None else grad_w.to(weight.dtype))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, rows):
        want = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss, grad_h, grad_w = _blocks(hidden, weight, targets, ignore_index, want, rows)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_loss.to(grad_h.dtype)
        return (grad_h * scale if ctx.needs_input_grad[0] else None,
                grad_w * scale.to(grad_w.dtype) if ctx.needs_input_grad[1] else None, None, None, None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX,
                         block_rows: int | None = None) -> Tensor:
    """Mean cross-entropy of the logits ``hidden @ weight.T`` against ``targets``, rows with
    ``targets == ignore_index`` left out (0 when every row is); see the module doc.
    block_rows: rows per block (default: about 8 MiB of float32 logits per block)."""
    _check(hidden, weight, targets)
    rows = block_rows or max(1, BLOCK_ELEMENTS // max(1, weight.shape[0]))
    if hidden.shape[0] == 0:  # no rows: 0, still connected to both inputs for autograd
        return (hidden.sum() * 0 + weight.sum() * 0).to(torch.float64 if hidden.dtype == torch.float64
                                                        else torch.float32)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden.contiguous(), weight, targets, ignore_index, rows)
    return _blocks(hidden, weight, targets, ignore_index, False, rows)[0]
