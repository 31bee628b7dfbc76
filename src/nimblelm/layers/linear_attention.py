"""The gated-linear-attention family as mixers: ``linear_attn``, ``based``, ``retnet``, ``gla``.

All four run on one op (:mod:`nimblelm.ops.gla`): state S_t = diag(a_t) S_{t-1} + phi(k_t)^T v_t,
output phi(q_t) S_t (optionally normalised by phi(q_t) z_t). They differ in the feature map
phi, the decay a_t and the output path:

* ``linear_attn``: no decay; phi from ``config.extra["feature_map"]`` — "elu" (elu+1,
  Katharopoulos, normalised, the default), "taylor" (first-order Taylor of Li et al. 2020:
  phi(q).phi(k) = 1 + q.k on L2-normalised q, k; normalised) or "identity" (unnormalised).
* ``based``: Based's second-order Taylor map on ``feature_dim``-sized q, k (default 16):
  phi(q).phi(k) = 1 + q.k/sqrt(d) + (q.k)^2/(2d), normalised. The exact sliding-window
  softmax half of Based is the ``local_attention`` mixer (see the ``based-hybrid`` preset).
* ``retnet``: fixed per-head decay gamma_h = 1 - 2^(-5-h); per-head RMSNorm and a swish
  output gate (RetNet's retention without the xPos rotation).
* ``gla``: data-dependent per-key-dimension decay a_t = exp(logsigmoid(W2 W1 x_t + b) / 16)
  from a rank-16 projection; key size head_dim / 2; per-head RMSNorm and swish output gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.config import ModelConfig
from ..ops import feature_maps
from ..ops.based import chunk_based, step_based
from ..ops.gla import chunk_gla, retnet_log_decay, step_gla
from .norms import gated_head_norm
from .recurrent import RecurrentMixer
from .registry import register_mixer

FEATURE_MAPS = {"identity": feature_maps.identity, "elu": feature_maps.elu_plus_one,
                "taylor": feature_maps.taylor_first_order, "taylor2": feature_maps.taylor_second_order}


class LinearAttentionMixer(RecurrentMixer):
    """Shared projections, state layout and forms; subclasses set the map, decay and output."""

    feature_map = "identity"
    normalize = False
    output_gate = False

    def __init__(self, config: ModelConfig, layer_idx: int, key_dim: int | None = None):
        super().__init__()
        self.num_heads, self.value_dim = config.num_heads, config.head_dim
        self.key_dim = key_dim or config.head_dim
        self.chunk_size = config.chunk_size
        hidden, heads = config.hidden_size, config.num_heads
        self.q_proj = nn.Linear(hidden, heads * self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden, heads * self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden, heads * self.value_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.value_dim, hidden, bias=False)
        if self.output_gate:
            self.gate_proj = nn.Linear(hidden, heads * self.value_dim, bias=False)
            self.head_norm = nn.RMSNorm(self.value_dim, eps=config.norm_eps)
        self.phi = FEATURE_MAPS[self.feature_map]
        self.phi_dim = feature_maps.feature_dim(self.phi.__name__, self.key_dim)

    # -- what subclasses vary ------------------------------------------------------------
    def scale(self) -> float:
        return 1.0 if self.normalize else self.phi_dim ** -0.5

    def decays(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(g [B, T, H] or None, gk [B, T, H, Dk] or None): log-decays for the op."""
        return None, None

    # -- the forms -----------------------------------------------------------------------
    def state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        shapes = {"S": (batch, self.num_heads, self.phi_dim, self.value_dim)}
        if self.normalize:
            shapes["z"] = (batch, self.num_heads, self.phi_dim)
        return shapes

    def _inputs(self, x: torch.Tensor):
        batch, length, _ = x.shape
        heads = (batch, length, self.num_heads, -1)
        # phi runs head-major, so its (wider) output needs no permuting copy inside chunk_gla
        q = self.phi(self.q_proj(x).view(heads).transpose(1, 2).contiguous()).transpose(1, 2)  # [B, T, H, F] view
        k = self.phi(self.k_proj(x).view(heads).transpose(1, 2).contiguous()).transpose(1, 2)
        v = self.v_proj(x).view(heads)  # [B, T, H, Dv]
        g, gk = self.decays(x)
        return dict(q=q, k=k, v=v, g=g, gk=gk, scale=self.scale(), normalize=self.normalize)

    def _op_state(self, state: dict | None):
        if state is None:
            return None
        return (state["S"], state["z"]) if self.normalize else state["S"]

    def _state_dict(self, op_state) -> dict:
        return {"S": op_state[0], "z": op_state[1]} if self.normalize else {"S": op_state}

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """o [B, T, H, Dv] -> [B, T, hidden]."""
        if self.output_gate:
            return self.o_proj(gated_head_norm(self.head_norm, o, self.gate_proj(x)))
        return self.o_proj(o.flatten(2))

    def sequence_forward(self, x: torch.Tensor, state: dict | None, positions=None):
        o, final = chunk_gla(**self._inputs(x), initial_state=self._op_state(state), output_final_state=True,
                             chunk_size=self.chunk_size)
        return self._output(o, x), self._state_dict(final)

    def step(self, x: torch.Tensor, state: dict, positions=None):
        o, new = step_gla(**self._inputs(x), state=self._op_state(state))
        return self._output(o, x), self._state_dict(new)


@register_mixer("linear_attn")
class LinearAttention(LinearAttentionMixer):
    def __init__(self, config: ModelConfig, layer_idx: int):
        self.feature_map = config.extra.get("feature_map", "elu")
        if self.feature_map not in ("identity", "elu", "taylor"):
            from ..errors import ConfigError

            raise ConfigError(f"linear_attn feature_map must be 'identity', 'elu' or 'taylor', got {self.feature_map!r}")
        self.normalize = self.feature_map != "identity"
        super().__init__(config, layer_idx)


@register_mixer("based")
class BasedLinearAttention(LinearAttentionMixer):
    """The forms of `ops.based` on the raw q, k: prefill through `chunk_based` (intra-chunk
    scores from q.k, not from the 153-wide features), decoding through `step_based`."""

    feature_map = "taylor2"
    normalize = True

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx, key_dim=config.extra.get("feature_dim", 16))

    def raw_inputs(self, x: torch.Tensor) -> dict:
        """chunk_based's q, k [B, T, H, feature_dim] and v [B, T, H, Dv] for x [B, T, hidden]."""
        heads = (x.shape[0], x.shape[1], self.num_heads, -1)
        return dict(q=self.q_proj(x).view(heads), k=self.k_proj(x).view(heads), v=self.v_proj(x).view(heads))

    def sequence_forward(self, x: torch.Tensor, state: dict | None, positions=None):
        o, final = chunk_based(**self.raw_inputs(x), initial_state=self._op_state(state), output_final_state=True,
                               chunk_size=self.chunk_size)
        return self._output(o, x), self._state_dict(final)

    def step(self, x: torch.Tensor, state: dict, positions=None):
        o, new = step_based(**self.raw_inputs(x), state=self._op_state(state))
        return self._output(o, x), self._state_dict(new)


@register_mixer("retnet")
class Retention(LinearAttentionMixer):
    output_gate = True

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.register_buffer("log_gamma", retnet_log_decay(config.num_heads, torch.float64), persistent=False)

    def decays(self, x):
        return self.log_gamma.to(x.dtype).expand(x.shape[0], x.shape[1], self.num_heads), None


@register_mixer("gla")
class GatedLinearAttention(LinearAttentionMixer):
    output_gate = True
    gate_rank, gate_temperature = 16, 16.0

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx, key_dim=max(config.head_dim // 2, 1))
        self.gk_down = nn.Linear(config.hidden_size, self.gate_rank, bias=False)
        self.gk_up = nn.Linear(self.gate_rank, self.num_heads * self.key_dim, bias=True)

    def decays(self, x):
        logits = self.gk_up(self.gk_down(x)).view(x.shape[0], x.shape[1], self.num_heads, self.key_dim)
        return None, F.logsigmoid(logits) / self.gate_temperature
