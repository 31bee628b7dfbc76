"""Rotary position embeddings (RoPE), "rotate half" convention (as Llama/Qwen2 in transformers)."""

from __future__ import annotations

import torch


def inverse_frequencies(head_dim: int, theta: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """theta^(-2i/D) for i < D/2, computed as transformers does (so converted models match)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype) / head_dim
    return 1.0 / (theta ** exponent)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, 1, T, head_dim] for integer ``positions`` [B, T].

    Angles are computed in inv_freq's dtype (float32 for float32 models, as transformers
    does; float64 for float64 models), then cast to ``dtype``."""
    angles = positions.to(inv_freq.dtype)[..., None] * inv_freq  # [B, T, D/2]
    angles = torch.cat((angles, angles), dim=-1)  # [B, T, D]
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first R channels of x [B, H, T, D] by the angles in cos/sin [B, 1, T, R]
    (R = D unless the model uses partial rotary); the other channels pass through."""
    rotary = cos.shape[-1]
    if rotary != x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]), dim=-1)
    half = rotary // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
