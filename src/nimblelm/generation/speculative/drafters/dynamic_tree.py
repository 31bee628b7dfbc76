"""EAGLE-2 dynamic draft trees (Li et al. 2024, "EAGLE-2: Faster Inference of Language Models
with Dynamic Draft Trees") for any autoregressive draft language model.

The algorithm, independent of where the draft distributions come from:

1. **Expansion** (:func:`expand_tree`). Start from the root (the last emitted token). For
   ``depth`` steps, take the frontier (the root at step 1; afterwards the ``top_k`` nodes of
   the newest layer with the highest score), ask ``expand`` for the draft's next-token
   log-probabilities after each frontier node, and give every frontier node its ``top_k``
   most probable tokens as children. A node's *score* is its cumulative draft log-probability
   (the sum along its path), an estimate of the log-probability that the target accepts the
   whole path.
2. **Rerank** (:func:`select_nodes`). Keep the ``total_tokens`` created nodes with the
   highest score. Scores never increase along a path (log-probabilities are clamped to <= 0
   and float addition is monotone) and ties are broken by creation order, in which a parent
   always precedes its children; so a kept node's parent always ranks before it and the kept
   set is closed under ancestors. Kept nodes, in creation order, are topologically ordered.

The resulting :class:`DraftTree` has ``child_probs=None``: its drafts are deterministic
(one-hot proposals), verified as EAGLE-2 does, which is lossless for greedy and for any
sampling configuration of the target. Scores use the draft's softmax at temperature 1
whatever the target's sampling settings.

``expand`` is the only model-specific piece: ``expand(tokens, parents, frontier)`` gets the
tree built so far (``tokens[i]``, ``parents[i]``, node 0 = root with parent -1) and the
frontier's node indices (increasing), and returns log-probabilities ``[len(frontier), V]``,
or a :class:`SubsetLogProbs` when the draft only covers a subset of the vocabulary (every
other token has probability 0; children then come from the subset).
:class:`DynamicTreeDrafter` implements it for a nimblelm LanguageModel with one tree call per
step; an EAGLE feature-level head plugs in its own.

**Tree size** ``total_tokens="auto"``: the target's cost of verifying n tokens, T(n), is
measured once per target on a scratch cache (median of a few timed tree calls at a grid of
sizes, linearly interpolated in between); the draft cost per round D is the median of the
measured wall time of recent proposals. Each round keeps the m nodes maximising the expected
throughput

    rate(m) = (1 + sum of the m best exp(score)) / (T(m + 1) + D),

where exp(score) of a node is the draft-estimated probability that its whole path is
accepted, so the sum is the expected number of accepted draft tokens and the 1 counts the
bonus token. The estimate assumes the draft is calibrated to the target; with a perfect
drafter it is exact for sampled decoding at temperature 1.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from ....cache import TreeSpec
from ....errors import GenerationError
from ..tree import DraftTree



@dataclass
class SubsetLogProbs:
    """Draft log-probabilities over a subset of the vocabulary (e.g. an FR-Spec draft
    vocabulary): ``values[f, j]`` is the log-probability of token ``token_ids[j]`` after
    frontier node f; every other token has probability exactly 0."""

    values: torch.Tensor  # [F, V_sub]
    token_ids: torch.Tensor  # [V_sub] long, distinct
    vocab_size: int

    def full(self) -> torch.Tensor:
        """[F, vocab_size] log-probabilities, -inf outside the subset (their exp is the
        distribution a sampled draft from this subset would be drawn from)."""
        out = self.values.new_full((self.values.shape[0], self.vocab_size), float("-inf"))
        return out.index_copy_(1, self.token_ids, self.values)


ExpandFn = Callable[[list[int], list[int], list[int]], "torch.Tensor | SubsetLogProbs"]


def top_children(logp: "torch.Tensor | SubsetLogProbs", k: int, num_frontier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An ``expand`` result -> the (at most) ``k`` best children of every frontier node:
    float64 log-probabilities clamped to <= 0 and token ids, both [F, min(k, candidates)]."""
    values, ids = (logp.values, logp.token_ids) if isinstance(logp, SubsetLogProbs) else (logp, None)
    if values.dim() != 2 or values.shape[0] != num_frontier:
        raise GenerationError(f"expand must return log-probabilities [{num_frontier}, V], got {tuple(values.shape)}")
    values = values.to(torch.float64).clamp(max=0.0)
    child_logp, index = values.topk(min(k, values.shape[1]), dim=-1)
    return child_logp, index if ids is None else ids[index]


# -- the algorithm -------------------------------------------------------------------------------
@dataclass
class Expansion:
    """Every node created by :func:`expand_tree`: node 0 is the root (score 0); nodes are in
    creation order, so ``parents[i] < i``."""

    tokens: list[int]
    parents: list[int]
    scores: torch.Tensor  # [n] float64 cumulative draft log-probabilities

    def __len__(self) -> int:
        return len(self.tokens)

    def ranking(self) -> torch.Tensor:
        """Non-root node indices, best score first; ties in creation order (parents first)."""
        order = torch.argsort(self.scores[1:], descending=True, stable=True)
        return order + 1


def expand_tree(root_token: int, expand: ExpandFn, depth: int, top_k: int) -> Expansion:
    """EAGLE-2 expansion: ``depth`` steps, each giving the ``top_k`` best frontier nodes their
    ``top_k`` most probable children (see the module docstring)."""
    tokens, parents = [int(root_token)], [-1]
    scores = [torch.zeros(1, dtype=torch.float64)]
    frontier = [0]
    for _ in range(depth):
        child_logp, child_tokens = top_children(expand(tokens, parents, frontier), top_k, len(frontier))  # [F, k]
        k = child_logp.shape[1]
        parent_scores = torch.cat(scores)[frontier]
        child_scores = (parent_scores[:, None] + child_logp).reshape(-1)  # [F * k], frontier-major
        first = len(tokens)
        tokens.extend(child_tokens.reshape(-1).tolist())
        parents.extend(p for p in frontier for _ in range(k))
        scores.append(child_scores)
        best = torch.argsort(child_scores, descending=True, stable=True)[:top_k]
        frontier = sorted(first + int(i) for i in best)
    return Expansion(tokens, parents, torch.cat(scores))


def select_nodes(expansion: Expansion, total_tokens: int) -> list[int]:
    """Root + the ``total_tokens`` best nodes (all of them when fewer exist), in creation
    order. Closed under ancestors (see the module docstring)."""
    if total_tokens < 0:
        raise GenerationError(f"total_tokens must be >= 0, got {total_tokens}")
    kept = expansion.ranking()[:total_tokens]
    return [0] + sorted(int(i) for i in kept)


def subtree(expansion: Expansion, kept: list[int]) -> DraftTree:
    """The DraftTree of the ``kept`` nodes (root first, increasing, closed under ancestors);
    deterministic drafts (``child_probs=None``)."""
    index = {node: i for i, node in enumerate(kept)}
    try:
        parents = [-1] + [index[expansion.parents[node]] for node in kept[1:]]
    except KeyError as exc:
        raise GenerationError(f"kept nodes {kept} are not closed under ancestors "
                              f"(node {exc.args[0]} missing)") from None
    return DraftTree([expansion.tokens[node] for node in kept], parents)


def best_size(expansion: Expansion, target_cost: Callable[[int], float], draft_cost: float) -> int:
    """The m in 1..len(expansion)-1 maximising (1 + sum of the m best exp(score)) /
    (target_cost(m + 1) + draft_cost)."""
    ranked = expansion.scores[expansion.ranking()]
    if ranked.numel() == 0:
        return 0
    expected = 1.0 + ranked.exp().cumsum(0)  # [M]: m = 1..M
    costs = torch.tensor([target_cost(m + 1) for m in range(1, ranked.numel() + 1)], dtype=torch.float64)
    rate = expected / (costs + draft_cost)
    return int(rate.argmax()) + 1


# -- costs for total_tokens="auto" ---------------------------------------------------------------
@dataclass
class TargetCost:
    """Measured seconds of one target call verifying ``sizes[i]`` tokens; linear in between,
    extrapolated linearly past the largest size."""

    sizes: list[int]
    seconds: list[float]

    def __call__(self, n: int) -> float:
        sizes, secs = self.sizes, self.seconds
        if n <= sizes[0]:
            return secs[0]
        for (a, ta), (b, tb) in zip(zip(sizes, secs), zip(sizes[1:], secs[1:])):
            if n <= b:
                return ta + (tb - ta) * (n - a) / (b - a)
        a, b = sizes[-2:] if len(sizes) > 1 else (sizes[0] - 1, sizes[0])
        ta, tb = secs[-2:] if len(secs) > 1 else (0.0, secs[0])
        return tb + (tb - ta) * (n - b) / max(b - a, 1)


def size_grid(largest: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, ... up to and including ``largest``."""
    sizes, base = [], 1
    while base < largest:
        sizes.extend(s for s in (base, base + base // 2) if s < largest and s not in sizes)
        base *= 2
    return sizes + [largest]


def calibration_tree(n: int, depth: int) -> TreeSpec:
    """A tree of n nodes over min(depth, n - 1) + 1 levels: a chain of ``depth`` nodes under
    the root, the other nodes spread over the levels above the deepest (what a verification tree looks like
    to a level-by-level recurrent mixer)."""
    chain = min(depth, n - 1)
    parents = [-1] + list(range(chain))
    parents += [i % chain for i in range(n - 1 - chain)]
    parents = parents[:1 + chain] + sorted(parents[1 + chain:])
    return TreeSpec(torch.tensor(parents))


@torch.no_grad()
def measure_target_cost(target, prompt: list[int], largest: int, depth: int, repeats: int = 3) -> TargetCost:
    """Median seconds of target tree calls of every grid size up to ``largest`` tokens, on a
    scratch cache holding ``prompt`` (one untimed warm-up call per size)."""
    cache = target.make_cache(1, len(prompt) + largest)
    if len(prompt) > 1:
        target(torch.tensor([prompt[:-1]]), cache=cache)
    sizes = size_grid(largest)
    seconds = []
    for n in sizes:
        spec = calibration_tree(n, depth)
        tokens = torch.tensor([[prompt[i % len(prompt)] for i in range(n)]])
        positions = (cache.length + spec.depth)[None]
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            target(tokens, positions, cache=cache, tree=spec)
            times.append(time.perf_counter() - start)
            cache.commit([])
        seconds.append(statistics.median(times[1:]))
    return TargetCost(sizes, seconds)


# -- the drafters ---------------------------------------------------------------------------------
class DynamicTreeSizing:
    """Tree sizes and ``"auto"`` calibration shared by every EAGLE-2 drafter; the class sets
    ``depth``, ``top_k``, ``total_tokens``, ``calibration_repeats``, ``vocab_size``,
    ``target_cost = None`` and ``_calibrated_for = None``."""

    @property
    def num_candidates(self) -> int:
        """Nodes an expansion creates (root excluded)."""
        k = min(self.top_k, self.vocab_size)
        total, frontier = 0, 1
        for _ in range(self.depth):
            total += frontier * k
            frontier = min(self.top_k, frontier * k)
        return total

    @property
    def max_tree_size(self) -> int:
        kept = self.num_candidates if self.total_tokens == "auto" else min(self.total_tokens, self.num_candidates)
        return kept + 1

    def calibrate(self, target, prompt: list[int]) -> TargetCost:
        """Measure the target's verification cost (once per target object, dtype and device)."""
        weight = next(iter(target.parameters()), None) if hasattr(target, "parameters") else None
        key = (id(target), None if weight is None else (weight.dtype, weight.device))
        if self.target_cost is None or self._calibrated_for != key:
            self.target_cost = measure_target_cost(target, prompt, self.num_candidates + 1, self.depth,
                                                   self.calibration_repeats)
            self._calibrated_for = key
        return self.target_cost


class DynamicTreeDrafter(DynamicTreeSizing):
    """EAGLE-2 dynamic trees from a nimblelm draft LanguageModel sharing the target's vocabulary.

    depth: expansion steps (the deepest draft token sits ``depth`` below the root); one
        draft-model call per step.
    top_k: children per expanded node and nodes expanded per step.
    total_tokens: draft nodes kept per round (root excluded), or ``"auto"`` to choose it per
        round from measured costs (module docstring).
    calibration_repeats: timed target calls per size when calibrating ``"auto"``.

    The draft model's cache holds only the emitted context (new context tokens are fed as a
    plain call at the start of a proposal, which also gives the root's distribution); each
    later step runs the frontier and its ancestors as one tree call and discards them with
    ``cache.commit([])``.
    """

    def __init__(self, model, depth: int = 5, top_k: int = 8, total_tokens: int | str = 32,
                 calibration_repeats: int = 3):
        if not hasattr(model, "make_cache") or not hasattr(model, "config"):
            raise GenerationError(f"DynamicTreeDrafter needs a nimblelm LanguageModel, got {type(model).__name__}")
        if depth < 1 or top_k < 1:
            raise ValueError(f"need depth >= 1 and top_k >= 1, got depth={depth}, top_k={top_k}")
        if total_tokens != "auto" and (isinstance(total_tokens, bool) or not isinstance(total_tokens, int)
                                       or total_tokens < 1):
            raise ValueError(f"total_tokens must be a positive integer or 'auto', got {total_tokens!r}")
        unsupported = sorted({type(b.mixer).__name__ for b in getattr(model, "blocks", [])
                              if not getattr(b.mixer, "supports_tree", False)})
        if unsupported:
            raise GenerationError(f"DynamicTreeDrafter runs tree calls on the draft model, which "
                                  f"{', '.join(unsupported)} layers do not support; use a draft model whose mixers "
                                  "support trees, or strategy='sps'")
        self.model, self.depth, self.top_k, self.total_tokens = model, depth, top_k, total_tokens
        self.calibration_repeats = calibration_repeats
        self.calls = 0
        self.target_cost: TargetCost | None = None
        self._calibrated_for: tuple | None = None
        self.draft_seconds: deque[float] = deque(maxlen=16)
        self.chosen_sizes: list[int] = []  # kept nodes of every proposal so far (statistics)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def begin(self, prompt: list[int], request) -> None:
        self.cache = self.model.make_cache(1, len(prompt) + request.max_new_tokens + self.top_k * self.depth + 1)
        self.seen, self.calls = 0, 0
        if self.total_tokens == "auto":
            self.calibrate(request.target, prompt)

    @torch.no_grad()
    def propose(self, context: list[int]) -> DraftTree:
        start = time.perf_counter()
        first = self.seen == 0
        out = self.model(torch.tensor([context[self.seen:]]), cache=self.cache, logits_to_keep=1)
        self.seen, self.calls = len(context), self.calls + 1
        fed = time.perf_counter()
        root_logp = out.logits[0, -1:].double().log_softmax(-1)

        def expand(tokens: list[int], parents: list[int], frontier: list[int]) -> torch.Tensor:
            return root_logp if frontier == [0] else self._expand(tokens, parents, frontier)

        expansion = expand_tree(context[-1], expand, self.depth, self.top_k)
        done = time.perf_counter()
        feed_s = fed - start
        if first and self.depth > 1:  # the feed was the prompt's prefill: count one expansion step instead
            feed_s = (done - fed) / (self.depth - 1)
        self.draft_seconds.append(feed_s + done - fed)
        if self.total_tokens == "auto":
            if self.target_cost is None:
                raise GenerationError("total_tokens='auto' needs the target's costs: call begin(prompt, request) "
                                      "or calibrate(target, prompt) first")
            size = best_size(expansion, self.target_cost, statistics.median(self.draft_seconds))
        else:
            size = self.total_tokens
        self.chosen_sizes.append(min(size, len(expansion) - 1))
        return subtree(expansion, select_nodes(expansion, size))

    def _expand(self, tokens: list[int], parents: list[int], frontier: list[int]) -> torch.Tensor:
        """Draft log-probs after each frontier node: one tree call over the frontier and its
        ancestors (root excluded: it is the last committed token of the draft cache)."""
        needed: set[int] = set()
        for node in frontier:
            while node > 0 and node not in needed:
                needed.add(node)
                node = parents[node]
        nodes = sorted(needed)  # frontier nodes are the newest, so they come last
        index = {node: i for i, node in enumerate(nodes)}
        spec = TreeSpec(torch.tensor([index.get(parents[node], -1) for node in nodes]))
        positions = (self.cache.length + spec.depth)[None]
        out = self.model(torch.tensor([[tokens[node] for node in nodes]]), positions, cache=self.cache, tree=spec,
                         logits_to_keep=len(frontier))
        self.cache.commit([])
        self.calls += 1
        return out.logits[0].double().log_softmax(-1)

    def accept(self, context: list[int], emission) -> None:
        pass
