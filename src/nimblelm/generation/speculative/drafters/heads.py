"""Shared pieces of the draft heads trained against a target (Medusa, Hydra, EAGLE).

* Binding: a head owns only its own weights; it reuses the target's LM head (and token
  embedding) through :func:`target_logits` / :func:`target_embed`, and is bound to the
  target lazily in ``begin(prompt, request)`` (:func:`bind_head`: shape checks, dtype and
  device follow the target). :class:`DraftLogProbs` turns predicted features into draft
  log-probabilities, over the whole vocabulary or over a draft vocabulary (FR-Spec).
* Static trees: :func:`rank_tree` builds a fixed sparse tree *shape* as rank paths (node
  ``(0, 2)`` = the best child of the root, then that node's third-best child), with more
  branching near the root; :func:`expand_static` fills in tokens depth by depth from any
  ``expand(tokens, parents, frontier) -> log-probs [F, V]`` callback (the same callback
  :func:`~.dynamic_tree.expand_tree` takes), one callback per depth.
* :class:`FeatureHeadDrafter`: the drafter side of Medusa / Hydra: keeps the target's hidden
  state of the token before the root (given by the engine through ``observe_features``).

Every tree built here has ``child_probs=None``: drafts are deterministic top-k choices,
verified as one-hot proposals, so greedy AND sampled decoding stay lossless.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from ....errors import GenerationError
from ....models.lm import apply_logit_softcap
from ..tree import DraftTree
from .dynamic_tree import SubsetLogProbs, top_children


# -- the target's pieces the heads reuse ---------------------------------------------------------
def check_target(target, kind: str) -> None:
    """Refuse targets that do not expose the embedding / LM head / hidden states heads need."""
    if not (hasattr(target, "embed") and hasattr(target, "head_weight") and hasattr(target, "config")):
        raise GenerationError(f"{kind} heads reuse the target's token embedding and LM head, so the target must be a "
                              f"nimblelm LanguageModel; got {type(target).__name__} (convert it with "
                              "nimblelm.integrations.hf.from_hf, or use strategy='sps'/'lookup')")


def target_logits(target, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [..., D] (post-final-norm features) -> the target's logits [..., V] (its head and
    logit soft-cap). Differentiable w.r.t. ``hidden``; the head itself stays frozen."""
    shape = hidden.shape
    logits = target._head_logits(hidden.reshape(1, -1, shape[-1])).reshape(*shape[:-1], -1)
    return apply_logit_softcap(logits, target.config.logit_softcap)


class DraftLogProbs:
    """Draft log-probabilities from predicted features through the target's LM head, over the
    whole vocabulary ([F, V] float64) or only over a draft vocabulary (sorted token ids,
    FR-Spec): then only those rows of the head are applied and the softmax runs over the
    subset, returned as a :class:`SubsetLogProbs` (every other token has probability exactly
    0). ``bind(target, vocab_ids)`` once per sequence; the [D, V_draft] head slice is rebuilt
    only when the weight or the ids change."""

    def __init__(self):
        self.target, self.vocab_ids, self.head_t, self._key = None, None, None, None

    def bind(self, target, vocab_ids: torch.Tensor | None) -> None:
        self.target = target
        if vocab_ids is None:
            self.vocab_ids = None
            return
        weight = target.head_weight.detach()
        ids = vocab_ids.to(weight.device)
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if self._key != key or self.vocab_ids is None or not torch.equal(self.vocab_ids, ids):
            self.head_t = weight.index_select(0, ids).t().contiguous()  # [D, V_draft]
            self._key = key
        self.vocab_ids = ids

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor | SubsetLogProbs:
        """hidden [F, D] -> float64 log-probabilities [F, V], or over the draft vocabulary."""
        if self.vocab_ids is None:
            return target_logits(self.target, hidden).double().log_softmax(-1)
        sub = apply_logit_softcap(hidden @ self.head_t, self.target.config.logit_softcap).double().log_softmax(-1)  # [F, V_draft]
        return SubsetLogProbs(sub, self.vocab_ids, self.target.config.vocab_size)


def target_embed(target, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [...] -> the target's input embeddings [..., D] (with its embedding scale)."""
    x = target.embed(tokens)
    if target.config.embedding_scale is not None:
        x = x * torch.tensor(target.config.embedding_scale, dtype=x.dtype)
    return x


def bind_head(head: nn.Module, target, kind: str) -> nn.Module:
    """Check ``head`` fits ``target`` (hidden size, vocabulary) and move it to the target's
    dtype and device (in place). Returns the head, in eval mode."""
    check_target(target, kind)
    cfg = target.config
    if head.hidden_size != cfg.hidden_size or head.vocab_size != cfg.vocab_size:
        raise GenerationError(
            f"the {kind} heads were built for hidden_size={head.hidden_size}, vocab_size={head.vocab_size} but the "
            f"target has hidden_size={cfg.hidden_size}, vocab_size={cfg.vocab_size}; load the heads trained for "
            "this target (nimblelm train drafter --target ...)")
    weight = target.embed.weight
    return head.to(device=weight.device, dtype=weight.dtype).eval()


# -- static tree shapes -----------------------------------------------------------------------
def rank_tree(num_nodes: int, max_depth: int, top_k: int, decay: float = 0.3,
              keep: float = 0.6) -> list[tuple[int, ...]]:
    """A fixed sparse tree of ``num_nodes`` draft nodes as rank paths, parents first.

    Path score = prod over its ranks of ``keep * decay**rank`` (a prior acceptance estimate:
    top-1 accepted with probability ``keep``, each lower rank ``decay`` times less likely);
    the best ``num_nodes`` paths with depth <= ``max_depth`` and ranks < ``top_k`` are kept.
    A prefix scores higher than its extensions, so the kept set is closed under parents
    (ties broken by depth, then lexicographically). Sorted by (depth, path): topological.
    """
    if num_nodes < 0 or max_depth < 1 or top_k < 1:
        raise ValueError(f"need num_nodes >= 0, max_depth >= 1, top_k >= 1; got {num_nodes}, {max_depth}, {top_k}")
    scored = []
    for depth in range(1, max_depth + 1):
        for path in itertools.product(range(top_k), repeat=depth):
            score = 1.0
            for rank in path:
                score *= keep * decay ** rank
            scored.append((-score, depth, path))
            if len(scored) > 200_000:
                raise ValueError("tree shape search too large: lower max_depth or top_k")
    kept = [path for _, _, path in sorted(scored)[:num_nodes]]
    return sorted(kept, key=lambda p: (len(p), p))


def shape_parents(shape: list[tuple[int, ...]]) -> list[int]:
    """Parent node index of every node of ``[()] + shape`` (root first, parent -1)."""
    index = {(): 0}
    parents = [-1]
    for i, path in enumerate(shape, start=1):
        if path[:-1] not in index:
            raise GenerationError(f"tree shape node {path} comes before its parent {path[:-1]}")
        parents.append(index[path[:-1]])
        index[path] = i
    return parents


def expand_static(root_token: int, shape: list[tuple[int, ...]], expand) -> DraftTree:
    """Fill the rank-path ``shape`` with tokens: at each depth, ``expand(tokens, parents,
    frontier)`` gives log-probs [F, V] (or a :class:`~.dynamic_tree.SubsetLogProbs`) after the
    frontier (the nodes of that depth that have children; node indices increasing) and child
    ``path`` gets the ``path[-1]``-th most probable token after its parent. Ranks >= the
    number of candidate tokens are dropped with their subtrees."""
    parents_all = shape_parents(shape)
    tokens, parents, new_index = [int(root_token)], [-1], {0: 0}
    for depth in range(1, max((len(p) for p in shape), default=0) + 1):
        level = [i for i, p in enumerate(shape, start=1) if len(p) == depth and parents_all[i] in new_index]
        if not level:
            break
        frontier = sorted({new_index[parents_all[i]] for i in level})
        _, ranked = top_children(expand(tokens, parents, frontier), 1 + max(shape[i - 1][-1] for i in level),
                                 len(frontier))
        k = ranked.shape[1]
        ranked = ranked.tolist()  # [F, k]
        row = {node: r for r, node in enumerate(frontier)}
        for i in level:
            rank = shape[i - 1][-1]
            if rank >= k:
                continue
            parent = new_index[parents_all[i]]
            new_index[i] = len(tokens)
            tokens.append(ranked[row[parent]][rank])
            parents.append(parent)
    return DraftTree(tokens, parents)


def node_depths(parents: list[int]) -> list[int]:
    depth = [0] * len(parents)
    for i, parent in enumerate(parents[1:], start=1):
        depth[i] = depth[parent] + 1
    return depth


def path_tokens(tokens: list[int], parents: list[int], node: int) -> list[int]:
    """Tokens from the root down to ``node``, both included."""
    path = [tokens[node]]
    while parents[node] >= 0:
        node = parents[node]
        path.append(tokens[node])
    return path[::-1]


# -- Medusa / Hydra drafter side ----------------------------------------------------------------
class FeatureHeadDrafter:
    """Base of drafters whose heads read the target's hidden state of the token before the
    root (whose logits produced the root). Subclasses define ``kind``, ``expand`` and the
    default tree shape arguments.

    heads: the head module (``hidden_size``, ``vocab_size``, ``num_heads`` attributes).
    tree_size: draft nodes per round (root excluded); max_depth <= the number of heads;
    top_k: most children per node.
    """

    kind = "heads"

    def __init__(self, heads: nn.Module, tree_size: int = 20, max_depth: int | None = None, top_k: int = 4):
        depth = heads.num_heads if max_depth is None else max_depth
        if not 1 <= depth <= heads.num_heads:
            raise GenerationError(f"max_depth must be in 1..{heads.num_heads} (the number of {self.kind} heads), "
                                  f"got {depth}")
        if tree_size < 1 or top_k < 1:
            raise GenerationError(f"need tree_size >= 1 and top_k >= 1, got tree_size={tree_size}, top_k={top_k}")
        self.heads = heads
        self.shape = rank_tree(tree_size, depth, top_k)
        self.calls = 0
        self.target = None
        self.feature: torch.Tensor | None = None

    @property
    def vocab_size(self) -> int:
        return self.heads.vocab_size

    @property
    def max_tree_size(self) -> int:
        return len(self.shape) + 1

    def begin(self, prompt: list[int], request) -> None:
        self.target = request.target
        bind_head(self.heads, self.target, self.kind)
        self.feature, self.calls = None, 0

    def observe_features(self, hidden: torch.Tensor) -> None:
        """hidden [n, D]: the target's features of the tokens that just entered its cache."""
        if hidden.shape[0]:
            self.feature = hidden[-1]

    @torch.no_grad()
    def propose(self, context: list[int]) -> DraftTree:
        if self.feature is None:  # a one-token prompt: nothing to draft from yet
            return DraftTree([context[-1]], [-1])
        return expand_static(context[-1], self.shape, self.expand)

    def expand(self, tokens: list[int], parents: list[int], frontier: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def accept(self, context: list[int], emission) -> None:
        pass
