"""Lossless verification of a draft tree against the target's processed distributions.

Every function takes ``target_probs`` [n, V]: row i is the target's processed next-token
distribution p after node i (``sampling.probabilities`` with the SamplingConfig that
autoregressive sampling uses; one-hot for greedy). It walks down from the root: at the
current node it tries the children in index order, moves to the first accepted child, and
when every child is rejected (or at a leaf) draws the next token from what is left of p.

The modes differ only in the proposal distribution each candidate is treated as drawn from,
and so in the acceptance probability and the residual after a rejection. With residual r
(initially p at the node) and candidate x proposed from q_j:

* accept x with probability min(1, r(x) / q_j(x));
* on rejection r <- norm(max(0, r - q_j)).

- greedy: accept the child equal to argmax p; the next token is argmax p at the end.
- deterministic drafts (``child_probs is None``: top-k children, greedy chains): q_j is
  one-hot at x, so x is accepted with probability r(x) and a rejection zeroes r(x).
- chain speculative sampling (Chen et al. 2023, Leviathan et al. 2023): one candidate per
  node, q_1 = q; a rejection draws from norm(max(0, p - q)).
- sampled siblings (SpecInfer, EAGLE-1, Recursive Speculative Decoding): q_1 = q; after a
  rejection q_{j+1} = q_j when siblings were drawn independently, and
  q_{j+1} = norm(q_j with x zeroed) when they were drawn without replacement -- the
  distribution the next sibling really was drawn from. The residual subtracts q_j BEFORE x
  is removed from it. Exactness, by induction over the candidates left: whatever the
  later candidates' proposal distributions, if trying them outputs a sample of r' then
  P(out = y) = min(r, q_j)(y) + (1 - sum min(r, q_j)) * norm(max(0, r - q_j))(y) = r(y),
  because sum max(0, r - q_j) = 1 - sum min(r, q_j). A rejected x always has
  r(x) < q_j(x), so r'(x) = 0: no token is proposed or emitted twice.

Randomness is pluggable: ``generator`` is a torch.Generator (or None for torch's default)
or any object with ``coin(prob) -> bool`` and ``categorical(probs) -> int``;
:func:`exact_outcomes` enumerates every branch of a verification with its exact probability.

Numerical guards: tokens with p = 0 are never emitted (every residual stays zero there);
acceptance ratios never divide by zero (q(x) = 0 accepts iff r(x) > 0); a residual with no
mass left -- possible only through rounding, an event of probability ~0 -- falls back to r
with the rejected token zeroed, then to r, never to NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, TypeVar

import torch

from ...errors import GenerationError
from .tree import DraftTree

T = TypeVar("T")
_WORK_DTYPE = torch.float64  # ratios and residuals are formed in float64 whatever the model's dtype


@dataclass
class VerifyResult:
    path: list[int]  # accepted node indices, starting with 0 = the root
    accepted: list[int]  # tokens of path[1:], the accepted draft tokens
    next_token: int  # bonus / correction token drawn at the last accepted node

    @property
    def tokens(self) -> list[int]:
        """Everything this round emits: accepted drafts then the next token."""
        return self.accepted + [self.next_token]


class Randomness(Protocol):
    def coin(self, prob: float) -> bool: ...

    def categorical(self, probs: torch.Tensor) -> int: ...


class TorchRandomness:
    """Coins and categorical draws from a torch.Generator (None = torch's global RNG)."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def coin(self, prob: float) -> bool:
        if prob <= 0.0:
            return False
        if prob >= 1.0:
            return True
        device = self.generator.device if self.generator is not None else "cpu"
        u = torch.rand((), generator=self.generator, device=device, dtype=torch.float64)
        return bool(u.item() < prob)

    def categorical(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.generator).item())


def as_randomness(generator) -> Randomness:
    if hasattr(generator, "coin") and hasattr(generator, "categorical"):
        return generator
    if generator is None or isinstance(generator, torch.Generator):
        return TorchRandomness(generator)
    raise GenerationError(f"generator must be a torch.Generator, None or a Randomness, got {type(generator).__name__}")


# -- the modes ---------------------------------------------------------------------------------
def verify_greedy(tree: DraftTree, target_probs: torch.Tensor, generator=None) -> VerifyResult:
    """Longest path whose tokens equal the target's argmax; next token = argmax at its end.
    Only the argmax of each row is read, so raw logits [n, V] work as well as probabilities."""
    _check_probs(tree, target_probs)
    best = target_probs.argmax(-1).tolist()
    tokens, node, path = tree.token_list, 0, [0]
    while True:
        match = next((c for c in tree.children[node] if tokens[c] == best[node]), None)
        if match is None:
            return _result(tree, path, best[node])
        node = match
        path.append(node)


def verify_greedy_on_demand(tree: DraftTree, argmax_of: Callable[[list[int]], list[int]],
                            vocab_size: int) -> VerifyResult:
    """:func:`verify_greedy` asking for the target's argmax only at the nodes the walk needs.

    ``argmax_of(nodes)`` -> the target's argmax token after each node. The rows are asked for
    a chain at a time: a node and its first-child descendants (the drafter's most likely
    continuation), so a walk that stays on first children costs one call, and a tree of n
    nodes rarely has all n rows scored (the LM head's [n, D] x [D, V] is the largest matmul of
    a verification for small models)."""
    _check_vocabulary(tree, vocab_size)
    tokens, children, best = tree.token_list, tree.children, {}
    node, path = 0, [0]
    while True:
        if node not in best:
            chain = [node]
            while children[chain[-1]]:
                chain.append(children[chain[-1]][0])
            best.update(zip(chain, argmax_of(chain)))
        match = next((c for c in children[node] if tokens[c] == best[node]), None)
        if match is None:
            return _result(tree, path, best[node])
        node = match
        path.append(node)


def verify_chain(tree: DraftTree, target_probs: torch.Tensor, generator=None) -> VerifyResult:
    """Speculative sampling on a draft chain: accept x with min(1, p(x)/q(x)); on rejection draw
    from norm(max(0, p - q)); after full acceptance draw the bonus from p at the last node.
    Deterministic chains (``child_probs is None``) use one-hot q."""
    if not tree.is_chain:
        raise GenerationError("verify_chain needs a chain (one child per node); use verify_tree_sampled or "
                              "verify_tree_deterministic for branching trees")
    return _walk(tree, target_probs, generator, sampled=tree.child_probs is not None, without_replacement=False)


def verify_tree_deterministic(tree: DraftTree, target_probs: torch.Tensor, generator=None) -> VerifyResult:
    """Multi-draft verification with one-hot proposals (EAGLE-2 / SpecInfer top-k trees): child x
    is accepted with probability r(x); a rejection zeroes r(x) and renormalises; when every
    child is rejected the next token is drawn from r. ``child_probs`` is ignored."""
    return _walk(tree, target_probs, generator, sampled=False, without_replacement=False)


def verify_tree_sampled(tree: DraftTree, target_probs: torch.Tensor, generator=None) -> VerifyResult:
    """Multi-draft speculative sampling for children drawn from ``child_probs``: independently
    (SpecInfer) or without replacement (EAGLE-1 / RSD), per ``children_sampled_without_replacement``."""
    if tree.child_probs is None:
        raise GenerationError("verify_tree_sampled needs the draft distributions (child_probs); "
                              "use verify_tree_deterministic for deterministic drafts")
    return _walk(tree, target_probs, generator, sampled=True,
                 without_replacement=tree.children_sampled_without_replacement)


def verify(tree: DraftTree, target_probs: torch.Tensor, generator=None, *, greedy: bool = False) -> VerifyResult:
    """Dispatch on what the tree declares: greedy decoding -> :func:`verify_greedy`; deterministic
    drafts -> :func:`verify_tree_deterministic`; sampled chain -> :func:`verify_chain`;
    sampled tree -> :func:`verify_tree_sampled`."""
    if greedy:
        return verify_greedy(tree, target_probs)
    if tree.child_probs is None:
        return verify_tree_deterministic(tree, target_probs, generator)
    if tree.is_chain:
        return verify_chain(tree, target_probs, generator)
    return verify_tree_sampled(tree, target_probs, generator)


# -- the shared walk -----------------------------------------------------------------------------
def _walk(tree: DraftTree, target_probs: torch.Tensor, generator, sampled: bool,
          without_replacement: bool) -> VerifyResult:
    _check_probs(tree, target_probs)
    rng = as_randomness(generator)
    node, path = 0, [0]
    while True:
        children = tree.children[node]
        draft = tree.child_probs[node].to(target_probs.device, _WORK_DTYPE) if sampled and children else None
        candidates = [tree.token_list[c] for c in children]
        chosen, residual = _try_children(rng, target_probs[node].to(_WORK_DTYPE), candidates, draft,
                                         without_replacement)
        if chosen is None:
            return _result(tree, path, rng.categorical(residual))
        node = children[chosen]
        path.append(node)


def _try_children(rng: Randomness, p: torch.Tensor, candidates: list[int], q: torch.Tensor | None,
                  without_replacement: bool) -> tuple[int | None, torch.Tensor | None]:
    """Index of the accepted candidate, or (None, residual to draw the next token from).
    ``q`` None = one-hot proposals."""
    residual = _normalise(p)
    q = None if q is None else _normalise(q)
    for j, token in enumerate(candidates):
        q_token = 1.0 if q is None else float(q[token])
        if rng.coin(_accept_probability(float(residual[token]), q_token)):
            return j, None
        residual = _residual(residual, token, q)
        if q is not None and without_replacement:
            q = _remove(q, token)
    return None, residual


def _accept_probability(r_token: float, q_token: float) -> float:
    if r_token <= 0.0:
        return 0.0
    if q_token <= r_token:  # also q_token == 0: the ratio is infinite
        return 1.0
    return r_token / q_token


def _residual(residual: torch.Tensor, token: int, q: torch.Tensor | None) -> torch.Tensor:
    """norm(max(0, r - q)) after rejecting ``token`` proposed from q (one-hot when None)."""
    if q is not None:
        left = (residual - q).clamp_min(0.0)
        mass = float(left.sum())
        if mass > 0.0:
            return left / mass
    left = residual.clone()
    left[token] = 0.0
    mass = float(left.sum())
    return left / mass if mass > 0.0 else residual


def _remove(q: torch.Tensor, token: int) -> torch.Tensor | None:
    """The proposal of the next sibling drawn without replacement; None (one-hot from then on)
    once q has no mass left."""
    q = q.clone()
    q[token] = 0.0
    mass = float(q.sum())
    return q / mass if mass > 0.0 else None


def _normalise(dist: torch.Tensor) -> torch.Tensor:
    mass = float(dist.sum())
    if not mass > 0.0 or mass != mass or mass == float("inf"):
        raise GenerationError(f"a probability row sums to {mass}; target and draft distributions must be "
                              "non-negative with positive, finite mass")
    return dist / mass


def _check_probs(tree: DraftTree, target_probs: torch.Tensor) -> None:
    n = len(tree)
    if not isinstance(target_probs, torch.Tensor) or target_probs.dim() != 2 or target_probs.shape[0] != n:
        shape = tuple(target_probs.shape) if isinstance(target_probs, torch.Tensor) else type(target_probs).__name__
        raise GenerationError(f"target_probs must have shape [n, V] = [{n}, V] (one row per tree node), got {shape}")
    _check_vocabulary(tree, target_probs.shape[1])


def _check_vocabulary(tree: DraftTree, vocab_size: int) -> None:
    """The draft's distributions and tokens fit the target's vocabulary of ``vocab_size``."""
    if tree.vocab_size is not None and tree.vocab_size != vocab_size:
        raise GenerationError(f"draft distributions cover {tree.vocab_size} tokens but the target's cover "
                              f"{vocab_size}; drafter and target must share one vocabulary")
    if max(tree.token_list) >= vocab_size:
        raise GenerationError(f"draft token {max(tree.token_list)} is out of range for a vocabulary of {vocab_size}")


def _result(tree: DraftTree, path: list[int], next_token: int) -> VerifyResult:
    return VerifyResult(path=path, accepted=[tree.token_list[i] for i in path[1:]], next_token=int(next_token))


# -- after verification ----------------------------------------------------------------------------
@dataclass
class Emission:
    """What a round emits once stop tokens and the token budget are applied.

    tokens: the emitted tokens (a prefix of ``accepted + [next_token]``).
    from_draft: per emitted token, whether it was an accepted draft token.
    commit: tree nodes to keep in the cache (``path[:len(tokens)]``): the last emitted token
        becomes the next round's root, which the cache has not seen yet.
    stopped: True when the round ended at a stop token.
    """

    tokens: list[int]
    from_draft: list[bool]
    commit: list[int]
    stopped: bool


def truncate_at_stop(result: VerifyResult, tree: DraftTree, stop_tokens: Iterable[int] = (),
                     max_tokens: int | None = None) -> Emission:
    """Cut ``accepted + [next_token]`` after the first stop token (kept) and at ``max_tokens``."""
    emitted = result.tokens
    if max_tokens is not None:
        if max_tokens < 0:
            raise GenerationError(f"max_tokens must be >= 0, got {max_tokens}")
        emitted = emitted[:max_tokens]
    stops = set(stop_tokens)
    stopped = False
    for i, token in enumerate(emitted):
        if token in stops:
            emitted, stopped = emitted[: i + 1], True
            break
    count = len(emitted)
    return Emission(tokens=emitted, from_draft=[i < len(result.accepted) for i in range(count)],
                    commit=list(result.path[:count]), stopped=stopped)


# -- exact enumeration -------------------------------------------------------------------------------
class _Unscripted(Exception):
    def __init__(self, branches: int):
        super().__init__(branches)
        self.branches = branches


class _Replay:
    """Randomness that follows a script of branch choices and records their probability."""

    def __init__(self, script: list[int]):
        self.script, self.position, self.probability = script, 0, 1.0

    def _choose(self, options: list[tuple[object, float]]):
        if self.position == len(self.script):
            raise _Unscripted(len(options))
        value, weight = options[self.script[self.position]]
        self.position += 1
        self.probability *= weight
        return value

    def coin(self, prob: float) -> bool:
        prob = min(max(float(prob), 0.0), 1.0)
        return self._choose([(v, w) for v, w in ((True, prob), (False, 1.0 - prob)) if w > 0.0])

    def categorical(self, probs: torch.Tensor) -> int:
        weights = probs.tolist()
        total = sum(weights)
        return self._choose([(i, w / total) for i, w in enumerate(weights) if w > 0.0])


def exact_outcomes(run: Callable[[Randomness], T]) -> list[tuple[float, T]]:
    """Every outcome of ``run(rng)`` with its exact probability, enumerating each coin and each
    categorical draw (zero-probability branches skipped). ``run`` must be deterministic given
    its random choices; meant for tiny vocabularies and trees."""
    outcomes: list[tuple[float, T]] = []
    pending: list[list[int]] = [[]]
    while pending:
        script = pending.pop()
        replay = _Replay(script)
        try:
            value = run(replay)
        except _Unscripted as branch:
            pending.extend(script + [k] for k in reversed(range(branch.branches)))
            continue
        outcomes.append((replay.probability, value))
    return outcomes
