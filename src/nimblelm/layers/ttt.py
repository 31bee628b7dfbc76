"""TTT-Linear and TTT-MLP mixers (Sun et al. 2024) on :mod:`nimblelm.ops.ttt`.

x -> q, k, v projections [B, T, H, D]; per-token inner learning rate
eta_t = base_lr * sigmoid(lr_proj x_t) / D per head; per-position scale within a mini-batch
s_i = max(1 / (i + 1) + token_bias_i, 0) (learnable bias, as the official code); the inner
model (W, b for TTT-Linear; W1, b1, W2, b2 for TTT-MLP, learnable initial values) is trained
on the fly by mini-batch (16) gradient descent; output o_t = q_t + LN(f(q_t; W_t)) ->
LayerNorm over the hidden size -> output projection. (The official model's rotary on q, k
and its short conv are not part of this mixer.)

Cache state holds the inner weights as offsets from their learnable initial values (so a
zero state is the start of a sequence) and the accumulated mini-batch gradients; where a
token sits inside its mini-batch is derived from its position.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.config import ModelConfig
from ..ops import ttt as ttt_ops
from .recurrent import RecurrentMixer
from .registry import register_mixer


class TTTMixer(RecurrentMixer):
    keys: tuple[str, ...] = ()
    base_lr = 1.0

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        hidden, self.num_heads, self.head_dim = config.hidden_size, config.num_heads, config.head_dim
        self.mini_batch = config.extra.get("ttt_mini_batch", 16)
        width = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, width, bias=False)
        self.k_proj = nn.Linear(hidden, width, bias=False)
        self.v_proj = nn.Linear(hidden, width, bias=False)
        self.lr_proj = nn.Linear(hidden, self.num_heads, bias=True)
        self.o_proj = nn.Linear(width, hidden, bias=False)
        self.post_norm = nn.LayerNorm(width, eps=1e-6)
        self.ttt_norm_weight = nn.Parameter(torch.ones(self.num_heads, self.head_dim))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))
        self.token_bias = nn.Parameter(torch.zeros(self.mini_batch))

    def inner_weights(self) -> dict[str, torch.Tensor]:
        """The learnable initial inner weights, named as in the op's state."""
        return {k: getattr(self, k) for k in self.keys}

    def state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for name, weight in self.inner_weights().items():
            shapes[name] = (batch, *weight.shape)
            shapes["grad_" + name] = (batch, *weight.shape)
        return shapes

    def _op_args(self, x: torch.Tensor) -> dict:
        batch, length, _ = x.shape
        heads = (batch, length, self.num_heads, self.head_dim)
        eta = self.base_lr * torch.sigmoid(self.lr_proj(x)) / self.head_dim  # [B, T, H]
        scale = (1.0 / torch.arange(1, self.mini_batch + 1, dtype=x.dtype, device=x.device) + self.token_bias).clamp(min=0)
        return dict(q=self.q_proj(x).view(heads), k=self.k_proj(x).view(heads), v=self.v_proj(x).view(heads),
                    eta=eta, ln_weight=self.ttt_norm_weight, ln_bias=self.ttt_norm_bias,
                    mini_batch_size=self.mini_batch, token_scale=scale, **self.inner_weights())

    def _to_op_state(self, state: dict | None, position: int) -> dict | None:
        if state is None:
            return None
        op_state = {k: t for k, t in state.items() if k.startswith("grad_")}
        op_state.update({k: state[k] + w for k, w in self.inner_weights().items()})
        op_state["offset"] = position % self.mini_batch
        return op_state

    def _from_op_state(self, op_state: dict) -> dict:
        state = {k: t for k, t in op_state.items() if k.startswith("grad_")}
        state.update({k: op_state[k] - w for k, w in self.inner_weights().items()})
        return state

    def _output(self, o: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.post_norm(o.flatten(2)))

    def _per_row(self, fn, x, state, positions):
        """Rows whose mini-batch offsets differ are run one by one."""
        if positions is None or x.shape[0] == 1 or bool((positions[:, 0] == positions[0, 0]).all()):
            return fn(x, state, positions)
        outs = [fn(x[b:b + 1], None if state is None else {k: t[b:b + 1] for k, t in state.items()},
                   positions[b:b + 1]) for b in range(x.shape[0])]
        return torch.cat([y for y, _ in outs]), {k: torch.cat([s[k] for _, s in outs]) for k in outs[0][1]}

    def sequence_forward(self, x: torch.Tensor, state: dict | None, positions=None):
        return self._per_row(self._sequence_rows, x, state, positions)

    def step(self, x: torch.Tensor, state: dict, positions=None):
        return self._per_row(self._step_rows, x, state, positions)

    def _sequence_rows(self, x, state, positions):
        start = 0 if positions is None else int(positions[0, 0])
        o, final = self.dual_form(**self._op_args(x), initial_state=self._to_op_state(state, start),
                                  output_final_state=True)
        return self._output(o), self._from_op_state(final)

    def _step_rows(self, x, state, positions):
        start = 0 if positions is None else int(positions[0, 0])
        o, new = self.step_form(**self._op_args(x), state=self._to_op_state(state, start))
        return self._output(o), self._from_op_state(new)


@register_mixer("ttt_linear")
class TTTLinear(TTTMixer):
    keys = ("W", "b")
    dual_form, step_form = staticmethod(ttt_ops.ttt_linear), staticmethod(ttt_ops.step_ttt_linear)

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.W = nn.Parameter(torch.randn(self.num_heads, self.head_dim, self.head_dim) * 0.02)
        self.b = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))


@register_mixer("ttt_mlp")
class TTTMLP(TTTMixer):
    keys = ("W1", "b1", "W2", "b2")
    base_lr = 0.1
    dual_form, step_form = staticmethod(ttt_ops.ttt_mlp), staticmethod(ttt_ops.step_ttt_mlp)

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        inner = 4 * self.head_dim
        self.W1 = nn.Parameter(torch.randn(self.num_heads, self.head_dim, inner) * 0.02)
        self.b1 = nn.Parameter(torch.zeros(self.num_heads, inner))
        self.W2 = nn.Parameter(torch.randn(self.num_heads, inner, self.head_dim) * 0.02)
        self.b2 = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))
