"""Feed-forward blocks: MLP, SwiGLU and a Mixture-of-Experts of SwiGLU experts.

Every FFN maps x [..., hidden] -> (y [..., hidden], aux_loss) where aux_loss is a scalar
tensor for MoE (the load-balancing loss the trainer adds) and None otherwise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.config import ModelConfig
from ..ops.activations import gelu_tanh
from .packing import PackedLinears, RepacksOnConversion
from .registry import register_ffn


@register_ffn("mlp")
class MLP(RepacksOnConversion, nn.Module):
    """fc -> GELU -> fc."""

    def __init__(self, config: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self._up = PackedLinears(self.up_proj)  # expanding: [in, out] storage streams faster

    def forward(self, x: torch.Tensor):
        up, = self._up(x)
        return self.down_proj(F.gelu(up)), None


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": gelu_tanh}


@register_ffn("swiglu")
class SwiGLU(RepacksOnConversion, nn.Module):
    """down(act(gate(x)) * up(x)): Llama's MLP with act = silu (config.hidden_act), GeGLU with gelu."""

    def __init__(self, config: ModelConfig, layer_idx: int = 0, intermediate_size: int | None = None):
        super().__init__()
        width = intermediate_size or config.intermediate_size
        bias = config.ffn_bias
        self.act = ACTIVATIONS[config.hidden_act]
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=bias)
        self._gate_up = PackedLinears(self.gate_proj, self.up_proj)  # one [hidden, 2 * width] matmul

    def forward(self, x: torch.Tensor):
        gate, up = self._gate_up(x)
        return self.down_proj(self.act(gate) * up), None


@register_ffn("moe")
class MixtureOfExperts(nn.Module):
    """Softmax router over ``num_experts`` SwiGLU experts; each token goes to its top-k.

    Output = sum over the chosen experts of router probability * expert(x) (probabilities
    renormalised over the top-k when ``config.moe_renormalize``). The auxiliary loss is the
    Switch-Transformer load-balancing loss E * sum_e f_e * P_e (f_e: fraction of routed
    slots sent to expert e, P_e: mean router probability of e); it is 1 when balanced."""

    def __init__(self, config: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.experts_top_k
        self.renormalize = config.moe_renormalize
        width = config.moe_intermediate_size or config.intermediate_size
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(config, intermediate_size=width) for _ in range(config.num_experts))

    def forward(self, x: torch.Tensor):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, hidden]
        probs = torch.softmax(self.router(flat), dim=-1)  # [N, E]
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [N, k]
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for expert_id in chosen.unique().tolist():
            rows, slot = (chosen == expert_id).nonzero(as_tuple=True)
            y, _ = self.experts[expert_id](flat.index_select(0, rows))
            out.index_add_(0, rows, y * weights[rows, slot, None])
        dispatch = torch.zeros_like(probs).scatter_(1, chosen, 1.0).mean(0) / self.top_k  # f_e
        aux_loss = self.num_experts * (dispatch * probs.mean(0)).sum()
        return out.reshape(shape), aux_loss
