"""Hawk / Griffin recurrent block (RG-LRU), parameter-compatible with transformers'
``RecurrentGemmaRecurrentBlock``.

y = gelu_tanh(linear_y(x)); u = conv(linear_x(x)) (depthwise, kernel ``config.conv_size``,
bias); RG-LRU over u: per head, block-diagonal input gate i_t and recurrence gate r_t
(sigmoid of u W + b), a_t = sigmoid(-Lambda)^(8 r_t), h_t = a_t h_{t-1} + sqrt(1 - a_t^2)
(i_t u_t) (multiplier 1 and no carry at position 0); output linear_out(h * y).
Width ``extra["lru_width"]`` (default hidden_size), heads = ``num_heads``.
State: conv window [B, width, K-1] and h [B, width].
Prefill without gradients runs gates, recurrence and the output branch in one native kernel
pass (``ops.native_scan.native_rglru_forward``); training runs ``rglru_gates`` and the native
recurrence (PyTorch forms where no kernel could be built).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models.config import ModelConfig
from ..ops.native_scan import linear_recurrence, native_inference_ok, native_rglru_forward
from ..ops.scan import rglru_gates, step_linear_recurrence
from ..ops.short_conv import causal_conv1d, step_causal_conv1d
from .recurrent import RecurrentMixer
from .registry import register_mixer


@register_mixer("rglru")
class RGLRUBlock(RecurrentMixer):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.width = config.extra.get("lru_width") or config.hidden_size
        self.num_heads = config.num_heads
        self.block = self.width // self.num_heads
        self.conv_size, self.chunk_size = config.conv_size, config.chunk_size
        hidden = config.hidden_size
        self.linear_y = nn.Linear(hidden, self.width, bias=True)
        self.linear_x = nn.Linear(hidden, self.width, bias=True)
        self.linear_out = nn.Linear(self.width, hidden, bias=True)
        self.conv_weight = nn.Parameter(torch.empty(self.width, self.conv_size))
        self.conv_bias = nn.Parameter(torch.zeros(self.width))
        self.input_gate_weight = nn.Parameter(torch.empty(self.num_heads, self.block, self.block))
        self.input_gate_bias = nn.Parameter(torch.zeros(self.num_heads, self.block))
        self.recurrent_gate_weight = nn.Parameter(torch.empty(self.num_heads, self.block, self.block))
        self.recurrent_gate_bias = nn.Parameter(torch.zeros(self.num_heads, self.block))
        self.recurrent_param = nn.Parameter(torch.empty(self.width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Griffin's initialisation: a = sigmoid(-Lambda) uniform in [0.9, 0.999]^(1/8)."""
        with torch.no_grad():
            bound = 1 / math.sqrt(self.conv_size)
            self.conv_weight.uniform_(-bound, bound)
            std = self.block ** -0.5
            self.input_gate_weight.normal_(0, std)
            self.recurrent_gate_weight.normal_(0, std)
            a = torch.empty(self.width).uniform_(0.9 ** 2 + 1e-8, 0.999 ** 2 + 1e-8).log() * 0.5 / 8
            self.recurrent_param.copy_(-(torch.log(-torch.expm1(a)) - a))  # sigmoid(-Lambda)^8 = a^8

    def state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        return {"conv": (batch, self.width, self.conv_size - 1), "h": (batch, self.width)}

    def _gate_logits(self, u: torch.Tensor):
        """u [B, T, width] -> (input gate logits, recurrence gate logits), both [B, T, width]."""
        batch, length, _ = u.shape
        heads = u.view(batch, length, self.num_heads, self.block)  # [B, T, H, blk]
        gate_x = torch.einsum("bthi,hij->bthj", heads, self.input_gate_weight) + self.input_gate_bias
        gate_a = torch.einsum("bthi,hij->bthj", heads, self.recurrent_gate_weight) + self.recurrent_gate_bias
        return gate_x.reshape(u.shape), gate_a.reshape(u.shape)

    @staticmethod
    def _resets(positions: torch.Tensor | None) -> torch.Tensor | None:
        """True where a sequence starts (transformers' ``position_ids == 0``), or None."""
        return None if positions is None else positions == 0

    def _gates(self, u: torch.Tensor, positions: torch.Tensor | None):
        """u [B, T, width] -> (normalized input, log decay), both [B, T, width]."""
        return rglru_gates(u, *self._gate_logits(u), self.recurrent_param, reset=self._resets(positions))

    def sequence_forward(self, x: torch.Tensor, state: dict | None, positions=None):
        y_branch = self.linear_y(x)
        u, conv = causal_conv1d(self.linear_x(x), self.conv_weight, self.conv_bias, None,
                                initial_state=None if state is None else state["conv"], output_final_state=True)
        if native_inference_ok(u, y_branch, self.recurrent_param, self.input_gate_weight):
            # inference: gates, recurrence and the gelu output branch in one native pass
            out, last = native_rglru_forward(u, *self._gate_logits(u), self.recurrent_param, y_branch,
                                             reset=self._resets(positions),
                                             initial_state=None if state is None else state["h"])
            return self.linear_out(out), {"conv": conv, "h": last}
        y = F.gelu(y_branch, approximate="tanh")
        normalized, log_a = self._gates(u, positions)
        h, last = linear_recurrence(normalized, log_a, initial_state=None if state is None else state["h"],
                                    output_final_state=True, chunk_size=self.chunk_size)
        return self.linear_out(h * y), {"conv": conv, "h": last}

    def step(self, x: torch.Tensor, state: dict, positions=None):
        y = F.gelu(self.linear_y(x), approximate="tanh")
        u, conv = step_causal_conv1d(self.linear_x(x), self.conv_weight, self.conv_bias, None, state=state["conv"])
        normalized, log_a = self._gates(u, positions)
        h, last = step_linear_recurrence(normalized, log_a, state=state["h"])
        return self.linear_out(h * y), {"conv": conv, "h": last}
