"""Mamba (S6) mixer, parameter-compatible with transformers' ``MambaMixer``.

in_proj(x) -> [u, z] (d_inner each, d_inner = expand * hidden); u -> causal depthwise conv
(kernel ``config.conv_size``, bias) -> silu; x_proj(u) -> [dt (rank R), B (N), C (N)];
delta = softplus(dt_proj(dt)); selective scan h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,
y_t = C_t . h_t + D u_t, y *= silu(z); out_proj. R = ceil(hidden / 16), N = ``state_size``.
State: conv window [B, d_inner, K-1] and SSM state [B, d_inner, N].
The scan runs in the native C kernel where one could be built (``ops.native_scan``), else in
the chunked PyTorch form; both match the naive loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models.config import ModelConfig
from ..ops.native_scan import selective_scan
from ..ops.scan import step_selective_scan
from ..ops.short_conv import causal_conv1d, step_causal_conv1d
from .recurrent import RecurrentMixer
from .registry import register_mixer


@register_mixer("mamba")
class Mamba(RecurrentMixer):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.d_inner = config.expand * config.hidden_size
        self.dt_rank = config.extra.get("dt_rank") or math.ceil(config.hidden_size / 16)
        self.state_size, self.conv_size, self.chunk_size = config.state_size, config.conv_size, config.chunk_size
        self.in_proj = nn.Linear(config.hidden_size, 2 * self.d_inner, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.d_inner, self.conv_size))
        self.conv_bias = nn.Parameter(torch.zeros(self.d_inner))
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.state_size, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.state_size))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """S4D-real A = -(1..N), dt in [1e-3, 1e-1] log-uniformly through the dt_proj bias."""
        with torch.no_grad():
            self.A_log.copy_(torch.arange(1, self.state_size + 1, dtype=torch.float32).log().expand_as(self.A_log))
            self.D.fill_(1.0)
            bound = 1 / math.sqrt(self.conv_size)
            self.conv_weight.uniform_(-bound, bound)
            self.conv_bias.uniform_(-bound, bound)
            nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        return {"conv": (batch, self.d_inner, self.conv_size - 1), "ssm": (batch, self.d_inner, self.state_size)}

    def _scan_inputs(self, u: torch.Tensor, z: torch.Tensor) -> dict:
        dt, Bm, Cm = self.x_proj(u).split([self.dt_rank, self.state_size, self.state_size], dim=-1)
        delta = F.softplus(self.dt_proj(dt))  # [B, T, d_inner]
        return dict(u=u, delta=delta, A=-torch.exp(self.A_log), Bmat=Bm, Cmat=Cm, D=self.D, z=z)

    def sequence_forward(self, x: torch.Tensor, state: dict | None, positions=None):
        u, z = self.in_proj(x).chunk(2, dim=-1)  # [B, T, d_inner] each
        u, conv = causal_conv1d(u, self.conv_weight, self.conv_bias, "silu",
                                initial_state=None if state is None else state["conv"], output_final_state=True)
        y, ssm = selective_scan(**self._scan_inputs(u, z), initial_state=None if state is None else state["ssm"],
                                output_final_state=True, chunk_size=self.chunk_size)
        return self.out_proj(y), {"conv": conv, "ssm": ssm}

    def step(self, x: torch.Tensor, state: dict, positions=None):
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u, conv = step_causal_conv1d(u, self.conv_weight, self.conv_bias, "silu", state=state["conv"])
        y, ssm = step_selective_scan(**self._scan_inputs(u, z), state=state["ssm"])
        return self.out_proj(y), {"conv": conv, "ssm": ssm}
