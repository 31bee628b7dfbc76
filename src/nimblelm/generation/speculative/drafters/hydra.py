"""Hydra heads (Ankner et al. 2024, "Hydra: Sequentially-Dependent Draft Heads for Medusa
Decoding"): like Medusa, but head i also sees the tokens drafted before it.

With h_t the target's final hidden state of token t, and e_1..e_{i+1} the target's input
embeddings of tokens t+1..t+1+i (t+1 = the round's root; the others the draft path), head i
predicts token t+2+i:

    z = h_t + P_i [e_1; ...; e_{i+1}]  ->  ``num_layers`` residual blocks  ->  target LM head

P_i starts at zero (an untrained Hydra head equals an untrained Medusa head). In a tree,
a node's children come from the head of its depth run on the node's own path, so children
of different parents differ: one batched head call per depth.
"""

from __future__ import annotations

import torch
from torch import nn

from .heads import FeatureHeadDrafter, node_depths, path_tokens, target_embed, target_logits
from .medusa import ResBlock


class HydraHeads(nn.Module):
    """``num_heads`` sequentially dependent heads (only their own weights)."""

    kind = "hydra"

    def __init__(self, hidden_size: int, vocab_size: int, num_heads: int = 4, num_layers: int = 1):
        super().__init__()
        if num_heads < 1 or num_layers < 1:
            raise ValueError(f"need num_heads >= 1 and num_layers >= 1, got {num_heads}, {num_layers}")
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.num_heads, self.num_layers = num_heads, num_layers
        self.embed_proj = nn.ModuleList(nn.Linear((i + 1) * hidden_size, hidden_size, bias=False)
                                        for i in range(num_heads))
        for proj in self.embed_proj:
            nn.init.zeros_(proj.weight)
        self.blocks = nn.ModuleList(nn.Sequential(*(ResBlock(hidden_size) for _ in range(num_layers)))
                                    for _ in range(num_heads))

    def config_dict(self) -> dict:
        return {"num_heads": self.num_heads, "num_layers": self.num_layers}

    def head(self, i: int, hidden: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Head i: hidden [..., D], prev [..., i+1, D] (embeddings of tokens t+1..t+1+i) ->
        predicted feature [..., D] of token t+2+i."""
        return self.blocks[i](hidden + self.embed_proj[i](prev.flatten(-2)))


class HydraDrafter(FeatureHeadDrafter):
    """Static trees (default: 20 draft nodes, depth = number of heads, top 4 per node); the
    tokens of a node's children depend on its path."""

    kind = "hydra"

    def expand(self, tokens: list[int], parents: list[int], frontier: list[int]) -> torch.Tensor:
        depth = node_depths(parents)[frontier[0]]  # every frontier node of a step has the same depth
        paths = torch.tensor([path_tokens(tokens, parents, node) for node in frontier],
                             device=self.feature.device)  # [F, depth + 1]
        prev = target_embed(self.target, paths)  # [F, depth + 1, D]
        feats = self.heads.head(depth, self.feature.expand(len(frontier), -1), prev)
        self.calls += 1
        return target_logits(self.target, feats).double().log_softmax(-1)
