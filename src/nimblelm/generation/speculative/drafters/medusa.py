"""Medusa heads (Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with
Multiple Decoding Heads"), Medusa-1 style: K heads on the frozen target.

Head i (0-based) reads the target's final hidden state h_t of a token t and predicts token
t+2+i: h -> ``num_layers`` residual blocks ``x + SiLU(W x + b)`` -> the target's own LM
head. The target's logits at t already give token t+1 (the round's root), so head i drafts
the nodes at depth i+1. The blocks' W start at zero: an untrained head repeats the target's
next-token distribution. Candidate trees come from the heads' top-k along a fixed sparse
tree shape (:func:`~.heads.rank_tree`); every node at depth d gets the same head-d ranking,
whatever its path (Medusa's heads do not see the drafted tokens; Hydra's do).
"""

from __future__ import annotations

import torch
from torch import nn

from .heads import FeatureHeadDrafter, node_depths, target_logits


class ResBlock(nn.Module):
    """x + SiLU(W x + b), W and b zero-initialised (the identity at init)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """``num_heads`` Medusa heads; only their residual blocks are weights of this module."""

    kind = "medusa"

    def __init__(self, hidden_size: int, vocab_size: int, num_heads: int = 4, num_layers: int = 1):
        super().__init__()
        if num_heads < 1 or num_layers < 1:
            raise ValueError(f"need num_heads >= 1 and num_layers >= 1, got {num_heads}, {num_layers}")
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.num_heads, self.num_layers = num_heads, num_layers
        self.heads = nn.ModuleList(nn.Sequential(*(ResBlock(hidden_size) for _ in range(num_layers)))
                                   for _ in range(num_heads))

    def config_dict(self) -> dict:
        return {"num_heads": self.num_heads, "num_layers": self.num_layers}

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., D] -> predicted features [..., K, D] (feed them to the target's head)."""
        return torch.stack([head(hidden) for head in self.heads], dim=-2)


class MedusaDrafter(FeatureHeadDrafter):
    """Static Medusa candidate trees (default: 20 draft nodes, depth = number of heads, top 4
    per node, more branching near the root). One head call per round."""

    kind = "medusa"

    def propose(self, context: list[int]):
        self._logp = None
        return super().propose(context)

    def expand(self, tokens: list[int], parents: list[int], frontier: list[int]) -> torch.Tensor:
        if self._logp is None:
            feats = self.heads(self.feature)  # [K, D]
            self._logp = target_logits(self.target, feats).double().log_softmax(-1)  # [K, V]
            self.calls += 1
        depth = node_depths(parents)[frontier[0]]  # every frontier node of a step has the same depth
        return self._logp[depth].expand(len(frontier), -1)
