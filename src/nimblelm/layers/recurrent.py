"""Shared machinery of recurrent (fixed-state) mixers: state objects, padding and draft trees.

A recurrent mixer subclasses :class:`RecurrentMixer` and implements three things:

* ``state_shapes(batch) -> {name: shape}``: its fixed-size state (e.g. the SSM state and
  the short-conv window), allocated once; decoding memory never grows with context.
* ``sequence_forward(x, state, positions) -> (y, state)``: the fast (chunkwise / parallel)
  form over a whole sequence x [B, T, hidden], starting from ``state`` (a dict of tensors, or
  None for zeros), returning the final state.
* ``step(x, state, positions) -> (y, state)``: one token x [N, 1, hidden] for a batch of N states.

``positions`` [B, T] (or [N, 1]) are the tokens' logical positions; most mixers ignore them
(Griffin's RG-LRU resets at position 0).

The base class turns these into the mixer interface of :mod:`nimblelm.layers.registry`:
left-padded rows are run one by one on their real tokens (padding never touches a state),
and a draft tree is verified level by level — each node's state computed from its parent's
with ``step``, all nodes of a level batched — so that ``cache.commit(path)`` can keep the
state of the last accepted node without re-running anything.
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache import ForwardInfo, TreeSpec


class RecurrentState:
    """Fixed-size state of one recurrent layer: ``tensors[name]`` [B, ...], plus the states
    of pending draft-tree nodes ``pending[name]`` [B, n, ...] between a tree call and commit."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], device, dtype):
        self.tensors = {name: torch.zeros(shape, device=device, dtype=dtype) for name, shape in shapes.items()}
        self.pending: dict[str, torch.Tensor] | None = None

    def commit(self, start: int, num_pending: int, keep: torch.Tensor) -> None:
        """Take the state of the last kept node (nothing kept: the state is unchanged)."""
        if self.pending is not None and keep.numel():
            last = int(keep[-1])
            self.tensors = {name: t[:, last].clone() for name, t in self.pending.items()}
        self.pending = None

    def select(self, rows: torch.Tensor) -> None:
        self.tensors = {name: t.index_select(0, rows) for name, t in self.tensors.items()}

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in self.tensors.items()}

    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        self.tensors = {name: t.clone() for name, t in saved.items()}
        self.pending = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class RecurrentMixer(nn.Module):
    """Base class; see the module docstring for what subclasses implement."""

    supports_tree = True
    supports_rollback = True  # via per-node states kept until commit
    uses_rope = False

    def state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def sequence_forward(self, x: torch.Tensor, state: dict | None, positions: torch.Tensor):
        raise NotImplementedError

    def step(self, x: torch.Tensor, state: dict, positions: torch.Tensor):
        raise NotImplementedError

    def init_state(self, batch: int, max_len: int, device=None, dtype=torch.float32) -> RecurrentState:
        return RecurrentState(self.state_shapes(batch), device, dtype)

    def forward(self, x: torch.Tensor, info: ForwardInfo, state: RecurrentState | None = None):
        """x [B, n, hidden] -> (y [B, n, hidden], state)."""
        if info.tree is not None:
            if state is None:
                raise ValueError("verifying a draft tree needs a cache (pass cache=model.make_cache(...))")
            return self._tree_forward(x, info.tree, info.positions, state), state
        mask = info.token_mask
        if mask is not None and not bool(mask.all()):
            return self._padded_forward(x, mask, info.positions, state), state
        y, final = self.sequence_forward(x, state.tensors if state is not None else None, info.positions)
        if state is not None:
            state.tensors = final
        return y, state

    def _padded_forward(self, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                        state: RecurrentState | None) -> torch.Tensor:
        """Left-padded rows one by one on their real tokens; outputs at padding are zero."""
        y = torch.zeros_like(x)
        finals = []
        for b in range(x.shape[0]):
            real = mask[b].nonzero()[:, 0]
            init = {k: t[b:b + 1] for k, t in state.tensors.items()} if state is not None else None
            y_b, final = self.sequence_forward(x[b:b + 1, real], init, positions[b:b + 1, real])
            y[b, real] = y_b[0].to(y.dtype)
            finals.append(final)
        if state is not None:
            state.tensors = {k: torch.cat([f[k] for f in finals]) for k in finals[0]}
        return y

    def _tree_forward(self, x: torch.Tensor, tree: TreeSpec, positions: torch.Tensor,
                      state: RecurrentState) -> torch.Tensor:
        """One state per node from its parent's state, level by level (all nodes of a level
        batched through ``step``). Node states stay pending until ``commit``."""
        batch, n, _ = x.shape
        pending = {k: t.new_zeros((batch, n) + t.shape[1:]) for k, t in state.tensors.items()}
        outputs: list[torch.Tensor | None] = [None] * n
        depth = tree.depth.tolist()
        parents = tree.parents.tolist()
        for level in range(max(depth) + 1 if n else 0):
            nodes = [i for i in range(n) if depth[i] == level]
            parent_states = {}
            for k, committed in state.tensors.items():
                per_node = [committed if parents[i] < 0 else pending[k][:, parents[i]] for i in nodes]
                parent_states[k] = torch.stack(per_node, 1).flatten(0, 1)  # [B * m, ...]
            x_level = x[:, nodes].reshape(batch * len(nodes), 1, -1)  # [B * m, 1, hidden]
            pos_level = positions[:, nodes].reshape(batch * len(nodes), 1)  # [B * m, 1]
            y_level, new_states = self.step(x_level, parent_states, pos_level)
            y_level = y_level.reshape(batch, len(nodes), -1)
            for j, i in enumerate(nodes):
                outputs[i] = y_level[:, j]
            for k, t in new_states.items():
                pending[k][:, nodes] = t.reshape((batch, len(nodes)) + t.shape[1:])
        state.pending = pending
        return torch.stack(outputs, 1)
