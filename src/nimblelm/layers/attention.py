"""Softmax attention mixer: RoPE, grouped-query heads, optional sliding window, optional
head-wise sigmoid output gate (Gated Attention: gate computed from the layer input, applied
to each head's SDPA output before the output projection). Tree masks come in through
:class:`~nimblelm.cache.ForwardInfo`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import ForwardInfo, KVState
from ..models.config import ModelConfig
from .packing import PackedLinears, RepacksOnConversion
from .registry import register_mixer
from .rotary import apply_rope


@register_mixer("attention")
class Attention(RepacksOnConversion, nn.Module):
    supports_tree = True
    supports_rollback = True
    uses_rope = True

    def __init__(self, config: ModelConfig, layer_idx: int, window: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.window = window
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.attention_out_bias)
        self.gate_proj = nn.Linear(hidden, self.num_heads, bias=True) if config.attn_output_gate else None
        gate = (self.gate_proj,) if self.gate_proj is not None else ()
        projections = (self.q_proj, self.k_proj, self.v_proj) + gate
        self._input_projections = PackedLinears(*projections)  # one [hidden, q+k+v(+gate)] matmul

    def init_state(self, batch: int, max_len: int, device=None, dtype=torch.float32) -> KVState:
        return KVState(batch, self.num_kv_heads, max_len, self.head_dim, device, dtype)

    def forward(self, x: torch.Tensor, info: ForwardInfo, state: KVState | None = None):
        """x [B, n, hidden] -> (y [B, n, hidden], state)."""
        batch, n, _ = x.shape
        q, k, v, *gate = self._input_projections(x)
        q = q.view(batch, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, n, D]
        k = k.view(batch, n, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, n, D]
        v = v.view(batch, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, info.cos, info.sin), apply_rope(k, info.cos, info.sin)
        if state is not None:
            k, v = state.write(info.start, k, v)  # all slots so far: [B, Hkv, start + n, D]
        out = self._attend(q, k, v, info)  # [B, H, n, D]
        if gate:
            out = out * torch.sigmoid(gate[0]).transpose(1, 2)[..., None]  # gate [B, n, H] -> [B, H, n, 1]
        out = out.transpose(1, 2).reshape(batch, n, self.num_heads * self.head_dim)
        return self.o_proj(out), state

    def _attend(self, q, k, v, info: ForwardInfo) -> torch.Tensor:
        gqa = self.num_heads != self.num_kv_heads
        if info.plain_causal and self.window is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=gqa)
        mask = info.attention_mask(self.window)
        first = info.first_visible_slot(self.window)  # slots before it are outside every window
        if first:
            k, v, mask = k[:, :, first:], v[:, :, first:], mask[..., first:]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


@register_mixer("local_attention")
class LocalAttention(Attention):
    """Sliding-window attention (Griffin's local attention); window = config.sliding_window."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        if config.sliding_window is None:
            from ..errors import ConfigError

            raise ConfigError("a local_attention layer needs sliding_window set in the model config")
        super().__init__(config, layer_idx, window=config.sliding_window)
