"""DeltaNet and Gated DeltaNet mixers (the delta rule, :mod:`nimblelm.ops.delta`).

x -> q, k, v projections -> short causal conv (kernel ``config.conv_size``, silu) on each
-> q, k L2-normalised per head; beta_t = sigmoid(b_proj x_t) per head;
S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T q_t / sqrt(Dk);
per-head RMSNorm of o, then the output projection.

``gated_deltanet`` adds the Mamba-2 style decay a_t = exp(-exp(A_log) softplus(a_proj x_t +
dt_bias)) and a swish output gate (Yang et al. 2024, "Gated Delta Networks").
State: the conv window over [q; k; v] channels [B, 2 H Dk + H Dv, K-1] and S [B, H, Dk, Dv].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models.config import ModelConfig
from ..ops.delta import chunk_delta_rule, step_delta_rule
from ..ops.short_conv import causal_conv1d, step_causal_conv1d
from .norms import gated_head_norm
from .recurrent import RecurrentMixer
from .registry import register_mixer


@register_mixer("deltanet")
class DeltaNet(RecurrentMixer):
    gated = False

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        hidden, heads, dim = config.hidden_size, config.num_heads, config.head_dim
        self.num_heads, self.head_dim = heads, dim
        self.conv_size, self.chunk_size = config.conv_size, config.chunk_size
        self.qkv_proj = nn.Linear(hidden, 3 * heads * dim, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(3 * heads * dim, config.conv_size))
        self.b_proj = nn.Linear(hidden, heads, bias=False)
        self.head_norm = nn.RMSNorm(dim, eps=config.norm_eps)
        self.o_proj = nn.Linear(heads * dim, hidden, bias=False)
        if self.gated:
            self.a_proj = nn.Linear(hidden, heads, bias=False)
            self.A_log = nn.Parameter(torch.empty(heads))
            self.dt_bias = nn.Parameter(torch.empty(heads))
            self.gate_proj = nn.Linear(hidden, heads * dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            bound = 1 / math.sqrt(self.conv_size)
            self.conv_weight.uniform_(-bound, bound)
            if self.gated:
                self.A_log.copy_(torch.empty(self.num_heads).uniform_(1, 16).log())
                dt = torch.exp(torch.rand(self.num_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
                self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        channels = 3 * self.num_heads * self.head_dim
        return {"conv": (batch, channels, self.conv_size - 1),
                "S": (batch, self.num_heads, self.head_dim, self.head_dim)}

    def _rule_inputs(self, x: torch.Tensor, qkv: torch.Tensor) -> dict:
        """x [B, T, hidden], qkv [B, T, 3 H D] after the conv -> delta-rule op arguments."""
        batch, length, _ = x.shape
        q, k, v = qkv.view(batch, length, 3, self.num_heads, self.head_dim).unbind(2)  # each [B, T, H, D]
        inputs = dict(q=F.normalize(q, dim=-1), k=F.normalize(k, dim=-1), v=v, beta=torch.sigmoid(self.b_proj(x)))
        if self.gated:
            inputs["g"] = -torch.exp(self.A_log) * F.softplus(self.a_proj(x) + self.dt_bias)  # [B, T, H]
        return inputs

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """o [B, T, H, D] -> [B, T, hidden]: head RMSNorm, the swish gate (gated), o_proj."""
        return self.o_proj(gated_head_norm(self.head_norm, o, self.gate_proj(x) if self.gated else None))

    def sequence_forward(self, x: torch.Tensor, state: dict | None, positions=None):
        qkv, conv = causal_conv1d(self.qkv_proj(x), self.conv_weight, None, "silu",
                                  initial_state=None if state is None else state["conv"], output_final_state=True)
        o, S = chunk_delta_rule(**self._rule_inputs(x, qkv), initial_state=None if state is None else state["S"],
                                output_final_state=True, chunk_size=self.chunk_size)
        return self._output(o, x), {"conv": conv, "S": S}

    def step(self, x: torch.Tensor, state: dict, positions=None):
        qkv, conv = step_causal_conv1d(self.qkv_proj(x), self.conv_weight, None, "silu", state=state["conv"])
        o, S = step_delta_rule(**self._rule_inputs(x, qkv), state=state["S"])
        return self._output(o, x), {"conv": conv, "S": S}


@register_mixer("gated_deltanet")
class GatedDeltaNet(DeltaNet):
    gated = True
