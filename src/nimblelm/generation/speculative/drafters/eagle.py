"""EAGLE feature-level draft head (Li et al. 2024, "EAGLE: Speculative Sampling Requires
Rethinking Feature Uncertainty"), used with a static tree (strategy ``eagle``) and with
EAGLE-2 dynamic trees (strategy ``eagle2``, :mod:`.dynamic_tree`).

With f_j the target's final (post-norm) hidden state of token j and e(x) the target's input
embedding, the head predicts the next feature autoregressively at the feature level:

    input_j = fc([e(x_{j+1}); f_j])  ->  one decoder layer (attention + SwiGLU, causal over
    j, RoPE at position j)  ->  RMSNorm  =  f^_{j+1};   draft logits = target LM head(f^_{j+1})

so f^_{j+1} predicts token x_{j+2}. While drafting, a draft node's input pairs its token
with its parent's PREDICTED feature (the root's with the target's real f of the token
before it). The head keeps its own KV cache over the committed context (entry j holds
[e(x_{j+1}); f_j], added as the target's features arrive).

Drafting is incremental: each depth runs only its new frontier nodes, appended to the head's
cache after the draft nodes of the earlier depths, with an attention mask letting a node see
the committed context, its own ancestors' entries and itself (the same attention as running
the node's whole path from scratch). After the round the cache returns to its committed
length (:meth:`Cache.snapshot` / :meth:`Cache.restore`).

**Draft vocabulary** (FR-Spec, Zhao et al. 2025): an EagleHead may carry ``draft_vocab``, a
sorted subset of frequent token ids (shipped as ``draft_vocab.safetensors`` next to the
drafter, see :mod:`nimblelm.drafter_io`). The drafter then scores only those rows of the
target's LM head; its draft distribution is the softmax over the subset, zero elsewhere
(:class:`~.dynamic_tree.SubsetLogProbs`), so children always come from the subset (fewer
than top_k when the subset is that small). Drafts stay
deterministic top-k choices (``child_probs=None``, one-hot proposals), so verification and
hence the output are unchanged; only which tokens get drafted changes.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from ....cache import Cache, ForwardInfo, TreeSpec
from ....errors import GenerationError
from ....layers.norm import RMSNorm
from ....layers.rotary import inverse_frequencies, rope_cos_sin
from ....models.config import ModelConfig
from ....models.lm import Block
from ..tree import DraftTree
from .dynamic_tree import (DynamicTreeSizing, SubsetLogProbs, TargetCost, best_size, expand_tree, select_nodes,
                           subtree)
from .heads import DraftLogProbs, bind_head, expand_static, rank_tree, target_embed


@dataclass
class DraftCallInfo(ForwardInfo):
    """A :class:`ForwardInfo` with a given attention mask ``fixed_mask`` [B, 1, n, start + n]
    (draft nodes that see the committed context and only their own ancestors among the
    cached draft entries)."""

    fixed_mask: torch.Tensor | None = None

    @property
    def plain_causal(self) -> bool:
        return False

    def attention_mask(self, window: int | None = None) -> torch.Tensor:
        if window is not None:
            raise GenerationError("EAGLE draft calls take a fixed attention mask; sliding windows are not supported")
        return self.fixed_mask


class EagleHead(nn.Module):
    """fc [2D -> D] -> one pre-norm decoder layer -> RMSNorm. Only its own weights; the token
    embedding and LM head are the target's. ``draft_vocab`` (None or sorted token ids, see
    :meth:`set_draft_vocab`) restricts drafting to a subset of the vocabulary."""

    kind = "eagle"

    def __init__(self, hidden_size: int, vocab_size: int, num_heads: int | None = None,
                 intermediate_size: int | None = None, rope_theta: float = 10000.0, norm_eps: float = 1e-6):
        super().__init__()
        num_heads = num_heads or max(1, hidden_size // 64)
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.layer_config = ModelConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=1,
                                        num_heads=num_heads, intermediate_size=intermediate_size,
                                        mixer_pattern=["attention"], ffn_pattern=["swiglu"], rope_theta=rope_theta,
                                        norm_eps=norm_eps)
        self.fc = nn.Linear(2 * hidden_size, hidden_size)
        self.layer = Block(self.layer_config, 0)
        self.norm = RMSNorm(hidden_size, norm_eps)
        self.register_buffer("rope_inv_freq", inverse_frequencies(self.layer_config.rotary_dim, rope_theta),
                             persistent=False)
        self.register_buffer("draft_vocab", None, persistent=False)  # [V_draft] long, sorted, or None
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def config_dict(self) -> dict:
        cfg = self.layer_config
        return {"num_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size, "rope_theta": cfg.rope_theta,
                "norm_eps": cfg.norm_eps}

    def set_draft_vocab(self, token_ids: torch.Tensor | list[int] | None) -> "EagleHead":
        """Draft only from ``token_ids`` (distinct ids in [0, vocab_size); stored sorted), or
        from the whole vocabulary (None). Returns the head."""
        if token_ids is None:
            self.draft_vocab = None
            return self
        ids = torch.as_tensor(token_ids)
        if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point() or ids.is_complex():
            raise GenerationError(f"a draft vocabulary is a non-empty 1-D tensor of token ids, got shape "
                                  f"{tuple(ids.shape)} and dtype {ids.dtype}")
        ids = ids.long().sort().values
        if int(ids[0]) < 0 or int(ids[-1]) >= self.vocab_size or bool((ids[1:] == ids[:-1]).any()):
            raise GenerationError(f"a draft vocabulary needs distinct token ids in [0, {self.vocab_size}); got ids "
                                  f"from {int(ids[0])} to {int(ids[-1])} ({ids.numel()} ids, "
                                  f"{int(ids.unique().numel())} distinct)")
        self.draft_vocab = ids.to(self.fc.weight.device)
        return self

    def make_cache(self, max_len: int) -> Cache:
        weight = self.fc.weight
        state = self.layer.mixer.init_state(1, max_len, weight.device, weight.dtype)
        return Cache([state], 1, max_len, weight.device)

    def forward(self, embeds: torch.Tensor, features: torch.Tensor, positions: torch.Tensor | None = None,
                cache: Cache | None = None, tree: TreeSpec | None = None) -> torch.Tensor:
        """embeds [B, n, D] (e(x_{j+1})), features [B, n, D] (f_j) -> predicted f^_{j+1} [B, n, D].

        positions [B, n] default to cache.length + arange(n) (or arange(n)); with a cache the
        entries are committed at once unless ``tree`` is given (then they stay pending).
        """
        if positions is None:
            offset = cache.length if cache is not None else 0
            positions = torch.arange(offset, offset + embeds.shape[1], device=embeds.device).expand(embeds.shape[:2])
        if cache is not None:
            info = cache.prepare(positions, None, tree)
        else:
            info = ForwardInfo(positions=positions, tree=tree, key_positions=positions)
        return self._run(embeds, features, info, cache, commit=tree is None)

    def draft_forward(self, embeds: torch.Tensor, features: torch.Tensor, positions: torch.Tensor, cache: Cache,
                      mask: torch.Tensor) -> torch.Tensor:
        """Draft nodes appended to ``cache``: embeds, features [1, n, D], positions [1, n],
        mask [n, cache.length + n] bool (the cached slots and new nodes each node attends to).
        The entries are committed (the drafter restores the cache after the round)."""
        info = cache.prepare(positions)
        info = DraftCallInfo(positions=positions, start=info.start, key_positions=info.key_positions,
                             fixed_mask=mask[None, None])
        return self._run(embeds, features, info, cache, commit=True)

    def _run(self, embeds: torch.Tensor, features: torch.Tensor, info: ForwardInfo, cache: Cache | None,
             commit: bool) -> torch.Tensor:
        info.cos, info.sin = rope_cos_sin(info.positions, self.rope_inv_freq, embeds.dtype)
        x = self.fc(torch.cat([embeds, features], dim=-1))
        x, state, _ = self.layer(x, info, cache.states[0] if cache is not None else None)
        if cache is not None:
            cache.states[0] = state
            if commit:
                cache.commit()
        return self.norm(x)


class EagleDrafter:
    """EAGLE with a static tree shape (default: 20 draft nodes, depth 5, top 4 per node): one
    EAGLE call per depth over that depth's expanded nodes (their ancestors' entries stay in the
    head's cache from the earlier depths). ``draft_vocab=False`` ignores the head's draft
    vocabulary (drafts from the whole vocabulary)."""

    kind = "eagle"

    def __init__(self, head: EagleHead, tree_size: int = 20, max_depth: int = 5, top_k: int = 4,
                 draft_vocab: bool = True):
        if not isinstance(head, EagleHead):
            raise GenerationError(f"{type(self).__name__} needs an EagleHead, got {type(head).__name__}")
        self.head = head
        self.shape = rank_tree(tree_size, max_depth, top_k)
        self.max_depth, self.top_k = max_depth, top_k
        self.use_draft_vocab = draft_vocab
        self.logprobs = DraftLogProbs()
        self.calls = 0

    @property
    def vocab_size(self) -> int:
        return self.head.vocab_size

    @property
    def max_tree_size(self) -> int:
        return len(self.shape) + 1

    def _max_call_nodes(self) -> int:
        """Most draft entries one round adds to the head's cache, plus one."""
        return self.max_tree_size

    def begin(self, prompt: list[int], request) -> None:
        self.target = request.target
        bind_head(self.head, self.target, "EAGLE")
        self.logprobs.bind(self.target, self.head.draft_vocab if self.use_draft_vocab else None)
        self.cache = self.head.make_cache(len(prompt) + request.max_new_tokens + self._max_call_nodes() + 1)
        self.features: list[torch.Tensor] = []  # target features not yet fed to the head, [n, D] each
        self.calls = 0

    def observe_features(self, hidden: torch.Tensor) -> None:
        """hidden [n, D]: the target's features of the tokens that just entered its cache."""
        if hidden.shape[0]:
            self.features.append(hidden)

    @torch.no_grad()
    def propose(self, context: list[int]) -> DraftTree:
        if not self._feed(context):
            return DraftTree([context[-1]], [-1])
        with self._drafting():
            return expand_static(context[-1], self.shape, self._expand)

    def _feed(self, context: list[int]) -> bool:
        """Add entries for the newly committed features (entry j = [e(x_{j+1}); f_j]); sets the
        root's predicted feature. False when no feature exists yet (a one-token prompt)."""
        if self.features:
            feats = torch.cat(self.features)  # [m, D]
            start = self.cache.length
            if start + feats.shape[0] != len(context) - 1:
                raise GenerationError(f"EAGLE drafter out of sync: {start} fed + {feats.shape[0]} new features for "
                                      f"{len(context) - 1} committed tokens")
            tokens = torch.tensor(context[start + 1:], device=feats.device)
            out = self.head(target_embed(self.target, tokens)[None], feats[None], cache=self.cache)
            self.calls += 1
            self.features = []
            self.root_feature = out[0, -1]
        return self.cache.length > 0

    @contextlib.contextmanager
    def _drafting(self):
        """One round's draft entries live in the head's cache after the committed ones; the
        cache returns to its committed state afterwards."""
        saved = self.cache.snapshot()
        self.committed = self.cache.length
        self.predicted = {0: self.root_feature}  # node -> predicted feature f^ after it
        self.slot_of: dict[int, int] = {}  # node -> its draft entry's slot (0 = first after the committed ones)
        self.ancestor_slots: list[list[int]] = []  # per slot: the slots of the node's path below the root
        self.node_depth = {0: 0}  # root 0, its children 1, ...
        try:
            yield
        finally:
            self.cache.restore(saved)

    def _expand(self, tokens: list[int], parents: list[int], frontier: list[int]) -> torch.Tensor | SubsetLogProbs:
        """Draft log-probs [F, V] (or over the draft vocabulary) after each frontier node (one
        head call for the frontier nodes not run yet)."""
        new = [node for node in frontier if node not in self.predicted]
        if new:
            self._draft_call(tokens, parents, new)
        feats = torch.stack([self.predicted[node] for node in frontier])  # [F, D]
        return self.logprobs(feats)

    def _draft_call(self, tokens: list[int], parents: list[int], nodes: list[int]) -> None:
        """Run ``nodes`` (increasing, each with a parent already run or the root) as new entries:
        input [e(token); f^ of the parent], position committed + depth - 1, attending to the
        committed context and the node's path."""
        first = len(self.ancestor_slots)
        rows = []
        for i, node in enumerate(nodes):
            parent = parents[node]
            if parent not in self.predicted:
                raise GenerationError(f"EAGLE drafting expands node {node} before its parent {parent}")
            above = self.ancestor_slots[self.slot_of[parent]] if parent > 0 else []
            self.slot_of[node] = first + i
            self.ancestor_slots.append(above + [first + i])
            self.node_depth[node] = self.node_depth[parent] + 1
            rows.append(self.ancestor_slots[-1])
        n, committed = len(nodes), self.committed
        device = self.root_feature.device
        mask = torch.zeros(n, committed + first + n, dtype=torch.bool)
        mask[:, :committed] = True
        mask[[i for i, row in enumerate(rows) for _ in row], [committed + s for row in rows for s in row]] = True
        positions = torch.tensor([[committed + self.node_depth[node] - 1 for node in nodes]], device=device)
        embeds = target_embed(self.target, torch.tensor([tokens[node] for node in nodes], device=device))
        feats = torch.stack([self.predicted[parents[node]] for node in nodes])
        out = self.head.draft_forward(embeds[None], feats[None], positions, self.cache, mask.to(device))[0]
        self.calls += 1
        for i, node in enumerate(nodes):
            self.predicted[node] = out[i]

    def accept(self, context: list[int], emission) -> None:
        pass


class Eagle2Drafter(DynamicTreeSizing, EagleDrafter):
    """EAGLE-2: dynamic trees (:func:`~.dynamic_tree.expand_tree` + :func:`select_nodes`)
    with the EAGLE head as ``expand``. depth (default 5) expansion steps, top_k (default 4)
    children per expanded node and expanded nodes per step, total_tokens (default 16) draft
    nodes kept per round or ``"auto"`` (measured target costs, see :mod:`.dynamic_tree`).
    ``draft_vocab=False`` ignores the head's draft vocabulary."""

    kind = "eagle2"

    def __init__(self, head: EagleHead, depth: int = 5, top_k: int = 4, total_tokens: int | str = 16,
                 calibration_repeats: int = 3, draft_vocab: bool = True):
        if depth < 1 or top_k < 1:
            raise GenerationError(f"need depth >= 1 and top_k >= 1, got depth={depth}, top_k={top_k}")
        if total_tokens != "auto" and (isinstance(total_tokens, bool) or not isinstance(total_tokens, int)
                                       or total_tokens < 1):
            raise GenerationError(f"total_tokens must be a positive integer or 'auto', got {total_tokens!r}")
        super().__init__(head, tree_size=1, max_depth=1, top_k=1, draft_vocab=draft_vocab)
        self.depth, self.top_k, self.total_tokens = depth, top_k, total_tokens
        self.calibration_repeats = calibration_repeats
        self.target_cost: TargetCost | None = None
        self._calibrated_for = None
        self.draft_seconds: deque[float] = deque(maxlen=16)
        self.chosen_sizes: list[int] = []

    def _max_call_nodes(self) -> int:
        return self.top_k * self.depth + 1

    def begin(self, prompt: list[int], request) -> None:
        super().begin(prompt, request)
        if self.total_tokens == "auto":
            self.calibrate(request.target, prompt)

    @torch.no_grad()
    def propose(self, context: list[int]) -> DraftTree:
        start = time.perf_counter()
        if not self._feed(context):
            return DraftTree([context[-1]], [-1])
        with self._drafting():
            expansion = expand_tree(context[-1], self._expand, self.depth, self.top_k)
        self.draft_seconds.append(time.perf_counter() - start)
        if self.total_tokens == "auto":
            size = best_size(expansion, self.target_cost, statistics.median(self.draft_seconds))
        else:
            size = self.total_tokens
        self.chosen_sizes.append(min(size, len(expansion) - 1))
        return subtree(expansion, select_nodes(expansion, size))
