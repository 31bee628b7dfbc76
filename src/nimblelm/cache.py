"""Inference caches and the per-call description of what a forward pass sees.

* :class:`Cache` owns one state object per layer (KV buffers for attention, recurrent /
  conv states for the mixer library), the logical position and validity of every slot,
  and the committed length. All buffers are preallocated to ``max_len`` slots.
* A forward pass writes its ``n`` new tokens to slots ``[length, length + n)`` as *pending*
  entries; :meth:`Cache.commit` keeps some of them (a draft-tree path, or all of them for
  ordinary decoding), gathered to contiguous slots, and advances ``length``.
* :class:`ForwardInfo` is built once per model call and shared by every layer: positions,
  rotary angles, the attention mask over cached + new slots, and the draft tree if any.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import CacheOverflowError, GenerationError


@dataclass
class TreeSpec:
    """Topology of ``n`` new tokens forming a draft tree: ``parents[i]`` is the index of
    node i's parent among the new tokens, or -1 when its parent is the last committed token.
    Nodes are topologically ordered (parents[i] < i)."""

    parents: torch.Tensor  # [n] long
    ancestor_mask: torch.Tensor = field(init=False)  # [n, n] bool: row i = ancestors of i + i
    depth: torch.Tensor = field(init=False)  # [n] long: 0 for children of the committed prefix

    def __post_init__(self) -> None:
        parents = self.parents.tolist()
        n = len(parents)
        mask = torch.eye(n, dtype=torch.bool)
        depth = [0] * n
        for i, parent in enumerate(parents):
            if not -1 <= parent < i:
                raise GenerationError(f"tree node {i} has parent {parent}; parents must precede their children")
            if parent >= 0:
                mask[i] |= mask[parent]
                depth[i] = depth[parent] + 1
        self.ancestor_mask = mask.to(self.parents.device)
        self.depth = torch.tensor(depth, dtype=torch.long, device=self.parents.device)

    @classmethod
    def chain(cls, n: int, device: torch.device | str = "cpu") -> "TreeSpec":
        return cls(torch.arange(-1, n - 1, device=device))

    def __len__(self) -> int:
        return int(self.parents.numel())


@dataclass
class ForwardInfo:
    """What one model call looks like, shared by all layers.

    positions: [B, n] logical positions of the new tokens.
    start: slot of the first new token in the cache (0 without a cache).
    token_mask: [B, n] bool, False at left-padding tokens (None = all real).
    tree: the draft tree over the new tokens, or None for a plain causal sequence.
    cos, sin: rotary angles [B, 1, n, head_dim] (filled by the model).
    """

    positions: torch.Tensor
    start: int = 0
    token_mask: torch.Tensor | None = None
    tree: TreeSpec | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    key_positions: torch.Tensor | None = None  # [B, start + n] logical positions of every key slot
    key_valid: torch.Tensor | None = None  # [B, start + n] bool, None = every slot valid
    _masks: dict = field(default_factory=dict, repr=False)
    _first_slots: dict = field(default_factory=dict, repr=False)

    @property
    def num_new(self) -> int:
        return self.positions.shape[1]

    @property
    def plain_causal(self) -> bool:
        """True when SDPA's ``is_causal`` gives the right mask (no cache prefix, padding or tree)."""
        return self.start == 0 and self.tree is None and self.key_valid is None

    def attention_mask(self, window: int | None = None) -> torch.Tensor | None:
        """Boolean mask [B, 1, n, start + n] (True = may attend), or None when no mask is
        needed (a single new token that may see every slot). Memoised per window."""
        if window in self._masks:
            return self._masks[window]
        n, start = self.num_new, self.start
        if n == 1 and window is None and self.key_valid is None:
            mask = None
        else:
            mask = self._build_mask(window)
        self._masks[window] = mask
        return mask

    def first_visible_slot(self, window: int | None) -> int:
        """The first key slot that some new token may attend to under a sliding ``window``
        (0 without one). Every earlier slot lies outside every query's window, so attention
        can skip it: decoding with a window then costs O(window), not O(context). Memoised."""
        if window is None or self.start == 0 or self.key_positions is None:
            return 0
        if window not in self._first_slots:
            earliest_query = self.positions.min(dim=1, keepdim=True).values  # [B, 1]
            reachable = (earliest_query - self.key_positions[:, :self.start] < window).any(0)  # [start]
            self._first_slots[window] = int(reachable.to(torch.uint8).argmax()) if bool(reachable.any()) else self.start
        return self._first_slots[window]

    def _build_mask(self, window: int | None) -> torch.Tensor:
        n, start = self.num_new, self.start
        device = self.positions.device
        if self.tree is not None:
            new_block = self.tree.ancestor_mask.to(device)
        else:
            new_block = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        prefix = torch.ones(n, start, dtype=torch.bool, device=device)
        mask = torch.cat([prefix, new_block], dim=1)[None].expand(self.positions.shape[0], n, start + n)
        if self.key_valid is not None:
            mask = mask & self.key_valid[:, None, :]
        if window is not None:
            key_pos = self.key_positions if self.key_positions is not None else self.positions
            mask = mask & (self.positions[:, :, None] - key_pos[:, None, :] < window)
        # every query may always see itself (keeps rows of padding tokens non-empty)
        eye = torch.zeros(n, start + n, dtype=torch.bool, device=device)
        eye[:, start:] = torch.eye(n, dtype=torch.bool, device=device)
        return (mask | eye)[:, None]


class KVState:
    """Preallocated key/value buffers of one attention layer: k, v [B, H_kv, max_len, D]."""

    def __init__(self, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str | None, dtype: torch.dtype):
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H_kv, n, D] at slots [start, start + n); return views of all slots so far."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def commit(self, start: int, num_pending: int, keep: torch.Tensor) -> None:
        """Move pending slots ``start + keep`` to contiguous slots starting at ``start``."""
        src = start + keep
        dst = slice(start, start + keep.numel())
        self.k[:, :, dst] = self.k.index_select(2, src)
        self.v[:, :, dst] = self.v.index_select(2, src)

    def select(self, rows: torch.Tensor) -> None:
        """Keep batch rows ``rows`` (e.g. to drop finished sequences)."""
        self.k = self.k.index_select(0, rows)
        self.v = self.v.index_select(0, rows)

    def snapshot(self) -> None:
        """Nothing to save: slots past the cache length are never read before being rewritten."""
        return None

    def restore(self, saved: None) -> None:
        pass

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class Cache:
    """Per-layer inference state plus slot bookkeeping shared by all layers.

    ``states[i]`` is whatever layer i's mixer returned from ``init_state``.
    ``positions[b, s]`` / ``valid[b, s]``: logical position and reality (not padding) of slot s.
    """

    def __init__(self, states: list, batch: int, max_len: int, device: torch.device | str | None):
        self.states = states
        self.batch = batch
        self.max_len = max_len
        self.length = 0
        self.pending = 0
        self.positions = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.has_padding = False

    def prepare(self, positions: torch.Tensor, token_mask: torch.Tensor | None = None,
                tree: TreeSpec | None = None) -> ForwardInfo:
        """Reserve slots for ``positions.shape[1]`` new tokens and describe the call."""
        if self.pending:
            raise GenerationError("the cache holds uncommitted tokens from a tree call; call cache.commit(path) first")
        batch, n = positions.shape
        if batch != self.batch:
            raise GenerationError(f"cache was allocated for batch {self.batch}, got batch {batch}")
        start, end = self.length, self.length + n
        if end > self.max_len:
            raise CacheOverflowError(
                f"cache overflow: {self.length} cached + {n} new tokens exceed the {self.max_len} slots allocated; "
                "allocate a larger cache (max_len) or generate fewer tokens")
        self.positions[:, start:end] = positions
        if token_mask is not None:
            self.valid[:, start:end] = token_mask
            self.has_padding = self.has_padding or not bool(token_mask.all())
        self.pending = n
        return ForwardInfo(positions=positions, start=start, token_mask=token_mask, tree=tree,
                           key_positions=self.positions[:, :end],
                           key_valid=self.valid[:, :end] if self.has_padding else None)

    def commit(self, keep: torch.Tensor | list[int] | None = None) -> None:
        """Keep the pending tokens ``keep`` (indices among the new tokens, in order; None = all)."""
        if keep is None:
            self.length += self.pending
            self.pending = 0
            return
        keep = torch.as_tensor(keep, dtype=torch.long, device=self.positions.device)
        start = self.length
        if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= self.pending):
            raise GenerationError(f"commit indices must lie in [0, {self.pending}), got {keep.tolist()}")
        for state in self.states:
            if state is not None:
                state.commit(start, self.pending, keep)
        dst = slice(start, start + keep.numel())
        self.positions[:, dst] = self.positions.index_select(1, start + keep)
        self.valid[:, dst] = self.valid.index_select(1, start + keep)
        self.length += keep.numel()
        self.pending = 0

    def snapshot(self) -> tuple:
        """Everything needed to return to the current committed state with :meth:`restore`
        (used by drafters, which extend their own cache with guesses and then roll back)."""
        if self.pending:
            raise GenerationError("cannot snapshot a cache with uncommitted tree tokens; commit first")
        return self.length, [s.snapshot() if s is not None else None for s in self.states]

    def restore(self, saved: tuple) -> None:
        length, states = saved
        for state, kept in zip(self.states, states):
            if state is not None:
                state.restore(kept)
        self.length, self.pending = length, 0

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.states if s is not None)
