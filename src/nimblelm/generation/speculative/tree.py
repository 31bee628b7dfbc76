"""Draft trees: the tokens a drafter proposes for one verification round.

Node 0 is the ROOT: the last emitted token, which the target has not seen yet (its parent is
the committed prefix, written -1). Nodes 1..n-1 are draft tokens in topological order
(``parents[i] < i``). A chain is the tree in which every node has at most one child.

``child_probs[i]`` is the draft distribution node i's CHILDREN were drawn from (so row i is
the drafter's next-token distribution after node i). ``child_probs is None`` declares the
drafts deterministic (top-k children as in EAGLE-2 / Medusa, a greedy draft chain, prompt
lookup): verification then treats every candidate as a one-hot proposal. When siblings were
sampled, ``children_sampled_without_replacement`` says how: True = each child drawn from q
with the earlier siblings removed and q renormalised (EAGLE-1, Recursive Speculative
Decoding); False = siblings drawn independently from q (SpecInfer's multi-draft sampling).
"""

from __future__ import annotations

from functools import cached_property

import torch

from ...cache import TreeSpec
from ...errors import GenerationError


class DraftTree:
    """A verified-in-one-call draft tree. Derived structure is computed once and cached;
    treat instances as immutable."""

    def __init__(self, tokens: torch.Tensor | list[int], parents: torch.Tensor | list[int],
                 child_probs: torch.Tensor | None = None,
                 children_sampled_without_replacement: bool | None = None):
        self.tokens = _as_long(tokens, "tokens")
        self.parents = _as_long(parents, "parents").to(self.tokens.device)
        self.child_probs = child_probs
        _check_topology(self.tokens, self.parents)
        _check_child_probs(self.tokens, child_probs)
        self.children_sampled_without_replacement = self._resolve_flag(children_sampled_without_replacement)

    @classmethod
    def chain(cls, tokens: torch.Tensor | list[int], child_probs: torch.Tensor | None = None) -> "DraftTree":
        """``tokens[0]`` is the root, ``tokens[1:]`` the draft chain."""
        n = len(tokens)
        return cls(tokens, torch.arange(-1, n - 1), child_probs)

    def _resolve_flag(self, flag: bool | None) -> bool:
        branching = any(len(c) > 1 for c in self.children)
        if flag is None:
            if self.child_probs is not None and branching:
                raise GenerationError(
                    "a draft tree with sampled siblings (child_probs given, a node with several children) must say "
                    "how they were drawn: pass children_sampled_without_replacement=True (each sibling drawn from q "
                    "with the earlier ones removed) or False (siblings drawn independently from q)")
            return False
        return bool(flag)

    # -- derived structure ----------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.tokens.numel())

    @property
    def vocab_size(self) -> int | None:
        return None if self.child_probs is None else int(self.child_probs.shape[1])

    @cached_property
    def _parent_list(self) -> list[int]:
        return self.parents.tolist()

    @cached_property
    def token_list(self) -> list[int]:
        return self.tokens.tolist()

    @cached_property
    def depth(self) -> torch.Tensor:
        """[n] long: 0 at the root, 1 at its children, ..."""
        depth = [0] * len(self)
        for i, parent in enumerate(self._parent_list[1:], start=1):
            depth[i] = depth[parent] + 1
        return torch.tensor(depth, dtype=torch.long, device=self.tokens.device)

    @cached_property
    def ancestor_mask(self) -> torch.Tensor:
        """[n, n] bool: row i marks i's ancestors and i itself (column 0 is all True)."""
        n = len(self)
        mask = torch.eye(n, dtype=torch.bool)
        for i, parent in enumerate(self._parent_list[1:], start=1):
            mask[i] |= mask[parent]
        return mask.to(self.tokens.device)

    def positions(self, prefix_len: int) -> torch.Tensor:
        """[n] long logical positions when ``prefix_len`` tokens are committed (the root sits at
        position ``prefix_len``)."""
        return self.depth + prefix_len

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        """``children[i]``: node indices of i's children, in index (= trial) order."""
        kids: list[list[int]] = [[] for _ in range(len(self))]
        for i, parent in enumerate(self._parent_list[1:], start=1):
            kids[parent].append(i)
        return tuple(tuple(k) for k in kids)

    @cached_property
    def leaves(self) -> tuple[int, ...]:
        return tuple(i for i, kids in enumerate(self.children) if not kids)

    @cached_property
    def paths(self) -> tuple[tuple[int, ...], ...]:
        """One root-to-leaf path of node indices per leaf, in leaf order."""
        return tuple(self.path_to(leaf) for leaf in self.leaves)

    def path_to(self, node: int) -> tuple[int, ...]:
        """Node indices from the root down to ``node``, both included."""
        path = [node]
        while path[-1] != 0:
            path.append(self._parent_list[path[-1]])
        return tuple(reversed(path))

    @cached_property
    def is_chain(self) -> bool:
        return all(len(kids) <= 1 for kids in self.children)

    def to_spec(self) -> TreeSpec:
        """The topology the model call needs (node 0's parent -1 = the committed prefix)."""
        return TreeSpec(self.parents.clone())

    def __repr__(self) -> str:
        mode = "deterministic" if self.child_probs is None else (
            "sampled without replacement" if self.children_sampled_without_replacement else "sampled")
        return f"DraftTree(n={len(self)}, tokens={self.token_list}, parents={self._parent_list}, {mode})"


def _as_long(values, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(values)
    if tensor.dim() != 1:
        raise GenerationError(f"draft tree {name} must be a 1-D sequence, got shape {tuple(tensor.shape)}")
    if tensor.numel() and (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool):
        raise GenerationError(f"draft tree {name} must be integers, got {tensor.dtype}")
    return tensor.long()


def _check_topology(tokens: torch.Tensor, parents: torch.Tensor) -> None:
    n = tokens.numel()
    if n == 0:
        raise GenerationError("a draft tree needs at least its root node (the last emitted token)")
    if parents.numel() != n:
        raise GenerationError(f"draft tree has {n} tokens but {parents.numel()} parents; give one parent per node")
    if int(tokens.min()) < 0:
        raise GenerationError(f"draft tree tokens must be non-negative ids, got {tokens.tolist()}")
    parent_list = parents.tolist()
    if parent_list[0] != -1:
        raise GenerationError(f"node 0 is the root and must have parent -1 (the committed prefix), "
                              f"got {parent_list[0]}")
    for i, parent in enumerate(parent_list[1:], start=1):
        if not 0 <= parent < i:
            raise GenerationError(f"draft tree node {i} has parent {parent}; every non-root node needs a "
                                  f"parent in [0, {i}) (nodes topologically ordered, only node 0 is a root)")


def _check_child_probs(tokens: torch.Tensor, child_probs: torch.Tensor | None) -> None:
    if child_probs is None:
        return
    if not isinstance(child_probs, torch.Tensor) or not child_probs.is_floating_point():
        raise GenerationError("child_probs must be a floating-point tensor [n, V] (or None for deterministic drafts)")
    n = tokens.numel()
    if child_probs.dim() != 2 or child_probs.shape[0] != n:
        raise GenerationError(f"child_probs must have shape [n, V] = [{n}, V] (one draft distribution per node), "
                              f"got {tuple(child_probs.shape)}")
    vocab = child_probs.shape[1]
    if int(tokens.max()) >= vocab:
        raise GenerationError(f"draft tree token {int(tokens.max())} is out of range for child_probs over "
                              f"{vocab} tokens")
