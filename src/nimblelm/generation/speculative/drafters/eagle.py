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
[e(x_{j+1}); f_j], added as the target's features arrive); draft entries are tree calls
discarded with ``cache.commit([])``.
"""

from __future__ import annotations

import statistics
import time
from collections import deque

import torch
from torch import nn

from ....cache import Cache, ForwardInfo, TreeSpec
from ....errors import GenerationError
from ....layers.norm import RMSNorm
from ....layers.rotary import inverse_frequencies, rope_cos_sin
from ....models.config import ModelConfig
from ....models.lm import Block
from ..tree import DraftTree
from .dynamic_tree import DynamicTreeSizing, TargetCost, best_size, expand_tree, select_nodes, subtree
from .heads import bind_head, expand_static, rank_tree, target_embed, target_logits


class EagleHead(nn.Module):
    """fc [2D -> D] -> one pre-norm decoder layer -> RMSNorm. Only its own weights; the token
    embedding and LM head are the target's."""

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
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def config_dict(self) -> dict:
        cfg = self.layer_config
        return {"num_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size, "rope_theta": cfg.rope_theta,
                "norm_eps": cfg.norm_eps}

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
        info.cos, info.sin = rope_cos_sin(positions, self.rope_inv_freq, embeds.dtype)
        x = self.fc(torch.cat([embeds, features], dim=-1))
        x, state, _ = self.layer(x, info, cache.states[0] if cache is not None else None)
        if cache is not None:
            cache.states[0] = state
            if tree is None:
                cache.commit()
        return self.norm(x)


class EagleDrafter:
    """EAGLE with a static tree shape (default: 20 draft nodes, depth 5, top 4 per node): one
    EAGLE call per depth over that depth's expanded nodes and their ancestors."""

    kind = "eagle"

    def __init__(self, head: EagleHead, tree_size: int = 20, max_depth: int = 5, top_k: int = 4):
        if not isinstance(head, EagleHead):
            raise GenerationError(f"{type(self).__name__} needs an EagleHead, got {type(head).__name__}")
        self.head = head
        self.shape = rank_tree(tree_size, max_depth, top_k)
        self.max_depth, self.top_k = max_depth, top_k
        self.calls = 0

    @property
    def vocab_size(self) -> int:
        return self.head.vocab_size

    @property
    def max_tree_size(self) -> int:
        return len(self.shape) + 1

    def _max_call_nodes(self) -> int:
        return self.max_tree_size

    def begin(self, prompt: list[int], request) -> None:
        self.target = request.target
        bind_head(self.head, self.target, "EAGLE")
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
        if self.cache.length == 0:
            return False
        self.predicted = {0: self.root_feature}
        return True

    def _expand(self, tokens: list[int], parents: list[int], frontier: list[int]) -> torch.Tensor:
        """Draft log-probs [F, V] after each frontier node (one tree call over the frontier and
        its ancestors when the frontier is below the root)."""
        if frontier != [0]:
            self._tree_call(tokens, parents, frontier)
        feats = torch.stack([self.predicted[node] for node in frontier])  # [F, D]
        return target_logits(self.target, feats).double().log_softmax(-1)

    def _tree_call(self, tokens: list[int], parents: list[int], frontier: list[int]) -> None:
        needed: set[int] = set()
        for node in frontier:
            while node > 0 and node not in needed:
                needed.add(node)
                node = parents[node]
        nodes = sorted(needed)
        index = {node: i for i, node in enumerate(nodes)}
        spec = TreeSpec(torch.tensor([index.get(parents[node], -1) for node in nodes]))
        positions = (self.cache.length + spec.depth)[None]
        device = self.root_feature.device
        embeds = target_embed(self.target, torch.tensor([tokens[node] for node in nodes], device=device))
        feats = torch.stack([self.predicted[parents[node]] for node in nodes])
        out = self.head(embeds[None], feats[None], positions, cache=self.cache, tree=spec)[0]  # [len(nodes), D]
        self.cache.commit([])
        self.calls += 1
        for node in frontier:
            self.predicted[node] = out[index[node]]

    def accept(self, context: list[int], emission) -> None:
        pass


class Eagle2Drafter(DynamicTreeSizing, EagleDrafter):
    """EAGLE-2: dynamic trees (:func:`~.dynamic_tree.expand_tree` + :func:`select_nodes`)
    with the EAGLE head as ``expand``. depth (default 5) expansion steps, top_k (default 4)
    children per expanded node and expanded nodes per step, total_tokens (default 16) draft
    nodes kept per round or ``"auto"`` (measured target costs, see :mod:`.dynamic_tree`)."""

    kind = "eagle2"

    def __init__(self, head: EagleHead, depth: int = 5, top_k: int = 4, total_tokens: int | str = 16,
                 calibration_repeats: int = 3):
        if depth < 1 or top_k < 1:
            raise GenerationError(f"need depth >= 1 and top_k >= 1, got depth={depth}, top_k={top_k}")
        if total_tokens != "auto" and (isinstance(total_tokens, bool) or not isinstance(total_tokens, int)
                                       or total_tokens < 1):
            raise GenerationError(f"total_tokens must be a positive integer or 'auto', got {total_tokens!r}")
        super().__init__(head, tree_size=1, max_depth=1, top_k=1)
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
        expansion = expand_tree(context[-1], self._expand, self.depth, self.top_k)
        self.draft_seconds.append(time.perf_counter() - start)
        if self.total_tokens == "auto":
            size = best_size(expansion, self.target_cost, statistics.median(self.draft_seconds))
        else:
            size = self.total_tokens
        self.chosen_sizes.append(min(size, len(expansion) - 1))
        return subtree(expansion, select_nodes(expansion, size))
