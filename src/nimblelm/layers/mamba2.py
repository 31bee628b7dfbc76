"""Mamba-2 (SSD) mixer, parameter-compatible with transformers' ``Mamba2Mixer``.

in_proj(x) -> [z (d_inner), xBC (d_inner + 2 G N), dt (H)]; xBC -> causal depthwise conv
(kernel ``config.conv_size``, silu) -> [x, B, C]; dt <- softplus(dt + dt_bias);
per head h: state S [N, P] with S_t = exp(dt_t A_h) S_{t-1} + (dt_t B_t)^T x_t and
y_t = C_t S_t + D_h x_t — i.e. gated linear attention with a scalar per-head decay
(q = C, k = dt * B, v = x, g = dt * A): prefill by :func:`nimblelm.ops.ssd.chunk_ssd` (which
shares B and C across a group's heads), decoding by :func:`nimblelm.ops.gla.step_gla`.
Then y <- grouped RMSNorm(y * silu(z)) * weight, and out_proj.

Sizes: d_inner = expand * hidden, P = ``extra["mamba_head_dim"]`` (default 64),
H = d_inner / P, N = ``config.state_size``, G = ``extra["n_groups"]`` (default 1).
State: conv window [B, conv_dim, K-1] and SSM state [B, H, N, P].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.config import ModelConfig
from ..ops.gla import step_gla
from ..ops.native_scan import native_gated_rmsnorm, native_inference_ok
from ..ops.short_conv import causal_conv1d, step_causal_conv1d
from ..ops.ssd import chunk_ssd
from ..ops.tree import tree_causal_conv1d, tree_gla_scalar
from .recurrent import RecurrentMixer
from .registry import register_mixer


@register_mixer("mamba2")
class Mamba2(RecurrentMixer):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.d_inner = config.expand * config.hidden_size
        self.head_dim = config.extra.get("mamba_head_dim", 64)
        self.n_groups = config.extra.get("n_groups", 1)
        self.state_size, self.conv_size, self.chunk_size = config.state_size, config.conv_size, config.chunk_size
        if self.d_inner % self.head_dim or (self.d_inner // self.head_dim) % self.n_groups:
            raise ConfigError(f"mamba2: expand * hidden_size ({self.d_inner}) must be a multiple of mamba_head_dim "
                              f"({self.head_dim}) and the head count a multiple of n_groups ({self.n_groups})")
        self.num_heads = self.d_inner // self.head_dim
        self.conv_dim = self.d_inner + 2 * self.n_groups * self.state_size
        self.eps = config.norm_eps
        self.in_proj = nn.Linear(config.hidden_size, self.d_inner + self.conv_dim + self.num_heads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, self.conv_size))
        self.conv_bias = nn.Parameter(torch.zeros(self.conv_dim))
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm_weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Mamba-2's initialisation: A in [1, 16], dt in [1e-3, 1e-1] log-uniformly, D = 1."""
        with torch.no_grad():
            self.A_log.copy_(torch.empty(self.num_heads).uniform_(1, 16).log())
            dt = torch.exp(torch.rand(self.num_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            self.D.fill_(1.0)
            bound = 1 / math.sqrt(self.conv_size)
            self.conv_weight.uniform_(-bound, bound)
            self.conv_bias.uniform_(-bound, bound)

    def state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        return {"conv": (batch, self.conv_dim, self.conv_size - 1),
                "ssm": (batch, self.num_heads, self.state_size, self.head_dim)}

    def _split(self, x: torch.Tensor):
        return self.in_proj(x).split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)

    def _ssd_parts(self, xBC: torch.Tensor, dt: torch.Tensor):
        """xBC [B, T, conv_dim] (after the conv), dt [B, T, H] -> chunk_ssd's (x [B,T,H,P],
        dt [B,T,H] after softplus, A [H], Bm [B,T,G,N], Cm [B,T,G,N])."""
        batch, length, _ = xBC.shape
        xs, Bm, Cm = xBC.split([self.d_inner, self.n_groups * self.state_size, self.n_groups * self.state_size], -1)
        dt = F.softplus(dt + self.dt_bias)  # [B, T, H]
        groups = (batch, length, self.n_groups, self.state_size)
        return (xs.view(batch, length, self.num_heads, self.head_dim), dt, -torch.exp(self.A_log),
                Bm.view(groups), Cm.view(groups))

    def _ssd_inputs(self, xBC: torch.Tensor, dt: torch.Tensor) -> dict:
        """xBC [B, T, conv_dim] (after the conv), dt [B, T, H] -> chunk_gla/step_gla arguments
        (B and C repeated for every head of their group)."""
        v, dt, A, Bm, Cm = self._ssd_parts(xBC, dt)
        per_group = self.num_heads // self.n_groups
        Bm = Bm.repeat_interleave(per_group, dim=2)  # [B,T,H,N]
        Cm = Cm.repeat_interleave(per_group, dim=2)
        return dict(q=Cm, k=Bm * dt[..., None], v=v, g=dt * A, scale=1.0)

    def _output(self, o: torch.Tensor, v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """o, v [B, T, H, P], z [B, T, d_inner] -> [B, T, hidden]."""
        if native_inference_ok(o, v, z, self.D, self.norm_weight):  # inference: one native pass
            y = native_gated_rmsnorm(o.flatten(2), self.norm_weight, self.eps, group=self.d_inner // self.n_groups,
                                     z=z, gate_first=True, v=v.flatten(2), d_skip=self.D)
            return self.out_proj(y)
        y = torch.addcmul(o, v, self.D[:, None]).flatten(2) * F.silu(z)  # [B, T, d_inner]
        groups = y.view(*y.shape[:-1], self.n_groups, -1)  # [B, T, G, d_inner / G]
        y = F.rms_norm(groups, groups.shape[-1:], eps=self.eps).flatten(2)
        return self.out_proj(y * self.norm_weight)

    def sequence_forward(self, x: torch.Tensor, state: dict | None, positions=None):
        z, xBC, dt = self._split(x)
        xBC, conv = causal_conv1d(xBC, self.conv_weight, self.conv_bias, "silu",
                                  initial_state=None if state is None else state["conv"], output_final_state=True)
        x_heads, dt, A, Bm, Cm = self._ssd_parts(xBC, dt)
        o, ssm = chunk_ssd(x_heads, dt, A, Bm, Cm, initial_state=None if state is None else state["ssm"],
                           output_final_state=True, chunk_size=self.chunk_size)
        return self._output(o, x_heads, z), {"conv": conv, "ssm": ssm}

    def step(self, x: torch.Tensor, state: dict, positions=None):
        z, xBC, dt = self._split(x)
        xBC, conv = step_causal_conv1d(xBC, self.conv_weight, self.conv_bias, "silu", state=state["conv"])
        inputs = self._ssd_inputs(xBC, dt)
        o, ssm = step_gla(**inputs, state=state["ssm"])
        return self._output(o, inputs["v"], z), {"conv": conv, "ssm": ssm}

    def _tree_forward(self, x: torch.Tensor, tree, positions, state) -> torch.Tensor:
        """All nodes of a draft tree in one pass (the masked SSD form over the ancestor mask)
        instead of one step per level; node states stay pending until ``commit``. Equal to
        the level-by-level base form (the tests' oracle)."""
        z, xBC, dt = self._split(x)  # [B, n, ...]
        xBC, conv_states = tree_causal_conv1d(xBC, self.conv_weight, self.conv_bias, "silu", state.tensors["conv"],
                                              tree.parents.tolist())
        inputs = self._ssd_inputs(xBC, dt)
        o, ssm_states = tree_gla_scalar(inputs["q"], inputs["k"], inputs["v"], inputs["g"], tree.ancestor_mask,
                                        inputs["scale"], state.tensors["ssm"])
        state.pending = {"conv": conv_states, "ssm": ssm_states}
        return self._output(o, inputs["v"], z)
