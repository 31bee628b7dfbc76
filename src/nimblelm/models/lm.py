"""The ONE generic causal language model of nimblelm.

embedding -> num_layers x Block(norm -> mixer -> residual, norm -> FFN -> residual)
-> final norm -> LM head (tied to the embedding or not). The mixer of each layer comes from
the registry by name (``config.layer_mixers()``), so hybrids are configuration only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import layers  # noqa: F401  (registers every mixer and FFN)
from ..cache import Cache, ForwardInfo, TreeSpec
from ..errors import GenerationError
from ..layers.norm import RMSNorm
from ..layers.registry import ffn_class, mixer_class
from ..layers.rotary import inverse_frequencies, rope_cos_sin
from .config import ModelConfig


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T_kept, V]; None when forward(compute_logits=False)
    hidden: torch.Tensor  # [B, T, hidden] final-norm hidden states (what drafter heads read)
    aux_loss: torch.Tensor | None = None  # sum of MoE load-balancing losses, None without MoE


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.mixer_norm = RMSNorm(config.hidden_size, config.norm_eps, config.norm_offset)
        self.mixer = mixer_class(config.layer_mixers()[layer_idx])(config, layer_idx)
        ffn_cls = ffn_class(config.layer_ffns()[layer_idx])
        self.ffn_norm = RMSNorm(config.hidden_size, config.norm_eps, config.norm_offset) if ffn_cls else None
        self.ffn = ffn_cls(config, layer_idx) if ffn_cls else None

    def forward(self, x: torch.Tensor, info: ForwardInfo, state=None):
        y, state = self.mixer(self.mixer_norm(x), info, state)
        x = x + y
        aux = None
        if self.ffn is not None:
            y, aux = self.ffn(self.ffn_norm(x))
            x = x + y
        return x, state, aux


def apply_logit_softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(logits / cap)`` (Gemma-2's logit soft-cap); identity when ``cap`` is None.
    Shared by the model and by draft heads that reuse a target's LM head."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


class LanguageModel(nn.Module):
    """Causal LM. ``model(tokens)`` -> :class:`ModelOutput`; see :meth:`forward`."""

    # forward(compute_logits=False) returns hidden states only, and head_logits(hidden) gives
    # the logits of any rows later: the speculative engine scores only the tree nodes it visits
    computes_logits_on_demand = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tokenizer = None  # a tokenizers.Tokenizer when loaded from a checkpoint that has one
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, config.norm_offset)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.uses_rope = any(getattr(b.mixer, "uses_rope", False) for b in self.blocks)
        self.register_buffer("rope_inv_freq", inverse_frequencies(config.rotary_dim, config.rope_theta), persistent=False)
        self.reset_parameters()

    # -- construction ------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for linear and embedding weights, zero biases;
        mixers with their own scheme define ``reset_parameters`` and are left to it."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            if hasattr(block.mixer, "reset_parameters"):
                block.mixer.reset_parameters()

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def make_cache(self, batch: int, max_len: int) -> Cache:
        """A cache with room for ``max_len`` tokens per row, in the model's device and dtype."""
        weight = self.embed.weight
        states = [b.mixer.init_state(batch, max_len, weight.device, weight.dtype) for b in self.blocks]
        return Cache(states, batch, max_len, weight.device)

    # -- forward -----------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache: Cache | None = None,
                tree: TreeSpec | None = None, token_mask: torch.Tensor | None = None,
                logits_to_keep: int = 0, compute_logits: bool = True) -> ModelOutput:
        """tokens [B, n] -> ModelOutput.

        positions: [B, n] logical positions (default: cache.length + arange(n), or arange(n)).
        cache: when given, the new tokens are appended; with ``tree=None`` they are committed
            at once, with a tree they stay pending until ``cache.commit(path)``.
        tree: the new tokens form a draft tree (attention sees ancestors only).
        token_mask: [B, n] bool, False at left-padding tokens.
        logits_to_keep: compute logits only for the last k positions (0 = all).
        compute_logits: False skips the LM head (``logits`` is None); see :meth:`head_logits`.
        """
        info = self._forward_info(tokens, positions, cache, tree, token_mask)
        x = self.embed(tokens)
        if self.config.embedding_scale is not None:
            x = x * torch.tensor(self.config.embedding_scale, dtype=x.dtype)
        aux_total = None
        for i, block in enumerate(self.blocks):
            state = cache.states[i] if cache is not None else None
            x, state, aux = block(x, info, state)
            if cache is not None:
                cache.states[i] = state
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        if cache is not None and tree is None:
            cache.commit()
        hidden = self.norm(x)
        logits = None
        if compute_logits:
            logits = self.head_logits(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return ModelOutput(logits=logits, hidden=hidden, aux_loss=aux_total)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [..., D] (``ModelOutput.hidden``) -> logits [..., V], the
        same as forward's (LM head, then the logit soft-cap)."""
        return apply_logit_softcap(self._head_logits(hidden), self.config.logit_softcap)

    def _head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, D] -> logits [B, T, V]. Without autograd, multiplies by a cached
        contiguous [D, V] copy of the head matrix: batch-1 GEMV over the [V, D] layout runs at
        about half the memory bandwidth on this CPU (measured 9-13 vs 20-24 GB/s), and the
        head is the largest matrix of small models. The copy is rebuilt whenever the weight
        changes (its storage or version counter)."""
        weight = self.head_weight
        if torch.is_grad_enabled() and weight.requires_grad:
            return torch.nn.functional.linear(hidden, weight)
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if getattr(self, "_head_t_key", None) != key:
            self._head_t = weight.detach().t().contiguous()  # [D, V]
            self._head_t_key = key
        return hidden @ self._head_t

    def _forward_info(self, tokens, positions, cache, tree, token_mask) -> ForwardInfo:
        if tokens.dim() != 2:
            raise GenerationError(f"tokens must have shape [batch, length], got {tuple(tokens.shape)}")
        if positions is None:
            offset = cache.length if cache is not None else 0
            positions = torch.arange(offset, offset + tokens.shape[1], device=tokens.device).expand_as(tokens)
        if cache is not None:
            info = cache.prepare(positions, token_mask, tree)
        else:
            key_valid = token_mask if token_mask is not None and not bool(token_mask.all()) else None
            info = ForwardInfo(positions=positions, token_mask=token_mask, tree=tree,
                               key_positions=positions, key_valid=key_valid)
        if self.uses_rope:
            info.cos, info.sin = rope_cos_sin(positions, self.rope_inv_freq, self.embed.weight.dtype)
        return info

    # -- checkpoints -------------------------------------------------------------------
    def save(self, directory: str) -> None:
        """Write config.json + model.safetensors (+ tokenizer.json) into ``directory``."""
        from .checkpoint import save_model

        save_model(self, directory)
