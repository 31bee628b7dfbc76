"""``short_conv``: Zoology's gated short-convolution mixer (BaseConv) on the stateful causal
depthwise convolution of :mod:`nimblelm.ops.short_conv`.

y = out_proj(conv(x) * in_proj(x)), conv depthwise with kernel ``config.conv_size`` and bias.
State: the conv window [B, hidden, K-1].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models.config import ModelConfig
from ..ops.short_conv import causal_conv1d, step_causal_conv1d
from .recurrent import RecurrentMixer
from .registry import register_mixer


@register_mixer("short_conv")
class ShortConv(RecurrentMixer):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.hidden, self.conv_size = config.hidden_size, config.conv_size
        self.in_proj = nn.Linear(self.hidden, self.hidden, bias=True)
        self.out_proj = nn.Linear(self.hidden, self.hidden, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.hidden, self.conv_size))
        self.conv_bias = nn.Parameter(torch.zeros(self.hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            bound = 1 / math.sqrt(self.conv_size)
            self.conv_weight.uniform_(-bound, bound)
            self.conv_bias.uniform_(-bound, bound)

    def state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        return {"conv": (batch, self.hidden, self.conv_size - 1)}

    def sequence_forward(self, x: torch.Tensor, state: dict | None, positions=None):
        conv, window = causal_conv1d(x, self.conv_weight, self.conv_bias, None,
                                     initial_state=None if state is None else state["conv"], output_final_state=True)
        return self.out_proj(conv * self.in_proj(x)), {"conv": window}

    def step(self, x: torch.Tensor, state: dict, positions=None):
        conv, window = step_causal_conv1d(x, self.conv_weight, self.conv_bias, None, state=state["conv"])
        return self.out_proj(conv * self.in_proj(x)), {"conv": window}
