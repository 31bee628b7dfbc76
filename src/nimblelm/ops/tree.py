"""Draft-tree forms of the short convolution and of scalar-decay gated linear attention (the
SSD / Mamba-2 recurrence), computed for ALL nodes of a tree at once instead of level by level.

A tree of n nodes is given by ``parents`` (list, ``parents[i] < i``, -1 = child of the
committed prefix) or its ancestor mask A [n, n] (A[i, j] = j is i or an ancestor of i). Node i
continues the sequence "committed prefix, then the path root -> i"; its outputs and its state
equal those of running that path step by step (:func:`~nimblelm.ops.short_conv.step_causal_conv1d`,
:func:`~nimblelm.ops.gla.step_gla`), which the tests use as the oracle.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .short_conv import _activate


def path_windows(parents: list[int], kernel: int) -> Tensor:
    """[n, kernel] long: for node i, the indices of the last ``kernel`` inputs of its path,
    oldest first, into [state columns 0..kernel-2 ; node m at kernel-1+m]. A path shorter
    than ``kernel`` continues into the committed state's most recent columns. Cached per
    (tree shape, kernel): every Mamba-2 layer of a model asks for the same one."""
    return _path_windows(tuple(parents), kernel).clone()


@functools.lru_cache(maxsize=64)
def _path_windows(parents: tuple[int, ...], kernel: int) -> Tensor:
    windows = []
    for i in range(len(parents)):
        row, column, node, taken = [0] * kernel, kernel - 1, i, 0
        while column >= 0 and node >= 0:
            row[column] = kernel - 1 + node
            node, column, taken = parents[node], column - 1, taken + 1
        for c in range(column + 1):  # state column (kernel-2) lands at window column kernel-1-taken
            row[c] = c + taken - 1
        windows.append(row)
    return torch.tensor(windows, dtype=torch.long).reshape(len(parents), kernel)


def tree_causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None, state: Tensor,
                       parents: list[int]) -> tuple[Tensor, Tensor]:
    """x [B, n, C] (one input per node), weight [C, K], state [B, C, K-1] (the committed
    window). Returns (y [B, n, C], node states [B, n, C, K-1]: each node's window after it)."""
    K = weight.shape[1]
    windows = path_windows(parents, K).to(x.device)  # [n, K] into [state ; nodes]
    extended = torch.cat([state, x.transpose(1, 2)], dim=2)  # [B, C, K-1+n]
    gathered = extended[:, :, windows]  # [B, C, n, K]
    y = (gathered * weight[None, :, None, :]).sum(-1)  # [B, C, n]
    if bias is not None:
        y = y + bias[None, :, None]
    y = _activate(y, activation).transpose(1, 2)  # [B, n, C]
    return y, gathered[..., 1:].permute(0, 2, 1, 3).contiguous()  # [B, n, C, K-1]


def tree_gla_scalar(q: Tensor, k: Tensor, v: Tensor, g: Tensor, ancestors: Tensor, scale: float,
                    state: Tensor) -> tuple[Tensor, "TreeNodeStates"]:
    """Scalar-decay gated linear attention over a tree.

    q, k [B, n, H, Dk], v [B, n, H, Dv], g [B, n, H] (log decay, <= 0), ancestors [n, n] bool,
    state [B, H, Dk, Dv] (the committed state S_0). Node i's state is
    S_i = exp(L_i) S_0 + sum_{j in path(i)} exp(L_i - L_j) k_j v_j^T with L_i the sum of g over
    path(i) (root..i), and o_i = scale * q_i S_i, computed attention-style without forming
    any S_i: o_i = scale * (exp(L_i) q_i S_0 + sum_j W_ij (q_i . k_j) v_j), W_ij = exp(L_i - L_j)
    on the path. Returns (o [B, n, H, Dv], node states: a :class:`TreeNodeStates` that
    computes S_i only for the node asked for, as ``states[:, i]`` [B, H, Dk, Dv])."""
    mask = ancestors.to(q.device)
    log_decay = torch.einsum("ij,bjh->bhi", mask.to(g.dtype), g)  # L [B, H, n]
    diff = log_decay[..., :, None] - log_decay[..., None, :]  # L_i - L_j [B, H, n, n]
    weights = torch.exp(diff.masked_fill(~mask, float("-inf")))  # 0 off the path
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, n, D]
    scores = (qh @ kh.transpose(-1, -2)) * weights  # [B, H, n, n]
    o = scores @ vh + (qh @ state) * torch.exp(log_decay)[..., None]  # [B, H, n, Dv]
    return (scale * o).transpose(1, 2), TreeNodeStates(kh, vh, weights, log_decay, state)


class TreeNodeStates:
    """The per-node states of :func:`tree_gla_scalar`, computed on demand: the engine keeps
    one node's state per round (the last accepted), so forming all n of them
    ([B, n, H, Dk, Dv]) is wasted work. Index it like that tensor: ``states[:, i]``."""

    def __init__(self, k: Tensor, v: Tensor, weights: Tensor, log_decay: Tensor, state: Tensor):
        self.k, self.v, self.weights, self.log_decay, self.state = k, v, weights, log_decay, state

    def __getitem__(self, index) -> Tensor:
        if not (isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None)
                and isinstance(index[1], int)):
            raise IndexError("TreeNodeStates supports only states[:, node] with an integer node")
        i = index[1]
        kw = self.k * self.weights[:, :, i, :, None]  # [B, H, n, Dk]: exp(L_i - L_j) k_j on i's path
        return self.state * torch.exp(self.log_decay[:, :, i])[..., None, None] + kw.transpose(-1, -2) @ self.v
