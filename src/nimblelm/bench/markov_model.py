"""The transformer of Makkuva et al. (2024), "Attention with Markov", for the ``--arch paper``
variant of the Markov probe: the model their bad-local-minimum analysis is about, which
differs from nimblelm's LanguageModel in ways that matter for that analysis.

Binary input x_n in {0, 1}: embedding x_n e + p_n (ONE vector e, so token 0 embeds to its
learned position vector p_n alone); per layer, single-head softmax attention with a residual
y = x + W_O attn(W_Q x, W_K x, W_V x), then a ReLU MLP with a residual z = y + W_2 relu(W_1 y);
no normalisation; the next-token probability is sigmoid(<a, z_n> + b), with a = e when the
weights are tied. Returned as two logits (0, <a, z> + b) so cross-entropy is the same as the
paper's binary log-loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PaperBlock(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.fc1 = nn.Linear(d_model, 4 * d_model, bias=False)
        self.fc2 = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # [B, T, D] each, one head
        y = x + self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return y + self.fc2(F.relu(self.fc1(y)))


class PaperMarkovModel(nn.Module):
    """forward(tokens [B, T]) -> logits [B, T, 2]; see the module docstring."""

    def __init__(self, d_model: int, max_len: int, num_layers: int, tied: bool, init_std: float = 0.02):
        super().__init__()
        self.e = nn.Parameter(torch.randn(d_model) * init_std)
        self.pos = nn.Parameter(torch.randn(max_len, d_model) * init_std)
        self.blocks = nn.ModuleList(PaperBlock(d_model) for _ in range(num_layers))
        self.a = None if tied else nn.Parameter(torch.randn(d_model) * init_std)
        self.b = nn.Parameter(torch.zeros(()))
        for block in self.blocks:
            for lin in (block.qkv, block.out, block.fc1, block.fc2):
                nn.init.normal_(lin.weight, std=init_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens[..., None].to(self.e.dtype) * self.e + self.pos[: tokens.shape[1]]  # [B, T, D]
        for block in self.blocks:
            x = block(x)
        logit = x @ (self.e if self.a is None else self.a) + self.b  # [B, T]
        return torch.stack([torch.zeros_like(logit), logit], dim=-1)
