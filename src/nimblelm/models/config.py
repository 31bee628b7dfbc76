"""ModelConfig: one flat dataclass describing every nimblelm model, plus named presets.

A model is embedding -> ``num_layers`` pre-norm blocks (mixer + FFN) -> norm -> head.
``mixer_pattern`` / ``ffn_pattern`` are lists of registry names, repeated cyclically
over the layers, so hybrids are just patterns (e.g. ``["rglru", "rglru", "local_attention"]``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError


@dataclass
class ModelConfig:
    """Hyper-parameters of a :class:`~nimblelm.LanguageModel`. Unknown keys are ignored by
    :meth:`from_dict`; every field has a default so old checkpoints keep loading."""

    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None  # grouped-query attention; None = num_heads
    head_dim: int | None = None  # None = hidden_size // num_heads
    intermediate_size: int | None = None  # FFN width; None = 4 * hidden_size (8/3 for SwiGLU, rounded)
    mixer_pattern: list[str] = field(default_factory=lambda: ["attention"])
    ffn_pattern: list[str] = field(default_factory=lambda: ["swiglu"])
    max_seq_len: int = 2048
    # attention
    rope_theta: float = 10000.0
    sliding_window: int | None = None  # window of "local_attention" layers
    attn_output_gate: bool = False  # Gated Attention: head-wise sigmoid gate after SDPA
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    attention_out_bias: bool = False  # bias on the output projection (RecurrentGemma)
    rope_fraction: float = 1.0  # rotate only the first rope_fraction of each head (partial rotary)
    # feed-forward
    hidden_act: str = "silu"  # activation of the gated FFN: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    ffn_bias: bool = False
    # mixture of experts
    num_experts: int = 8
    experts_top_k: int = 2
    moe_intermediate_size: int | None = None  # None = intermediate_size
    moe_renormalize: bool = False  # renormalise the top-k router probabilities (Mixtral) or not (Jamba)
    # recurrent mixers (used by the mixer library)
    state_size: int = 16
    conv_size: int = 4
    expand: int = 2
    chunk_size: int = 64
    # norms, embeddings, init
    norm_eps: float = 1e-6
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight); Gemma-style models use 1
    embedding_scale: float | None = None  # multiply embeddings by this (Gemma: sqrt(hidden_size))
    logit_softcap: float | None = None  # logits <- cap * tanh(logits / cap)
    tie_embeddings: bool = True
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)  # mixer-specific options

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                    "set head_dim explicitly or change num_heads"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        self.mixer_pattern = list(self.mixer_pattern)
        self.ffn_pattern = list(self.ffn_pattern)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field to change when the config is inconsistent."""
        positive = ["vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "intermediate_size", "max_seq_len"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if not self.mixer_pattern or not self.ffn_pattern:
            raise ConfigError("mixer_pattern and ffn_pattern must name at least one layer type each")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive or null, got {self.sliding_window}")
        if self.hidden_act not in ("silu", "gelu_tanh", "gelu"):
            raise ConfigError(f"hidden_act must be 'silu', 'gelu' or 'gelu_tanh', got {self.hidden_act!r}")
        rotary_dim = int(self.head_dim * self.rope_fraction)
        if not 0 < self.rope_fraction <= 1 or rotary_dim % 2:
            raise ConfigError(f"rope_fraction {self.rope_fraction} must be in (0, 1] and give an even rotary size "
                              f"(head_dim {self.head_dim} * rope_fraction = {self.head_dim * self.rope_fraction})")
        if not 0 < self.experts_top_k <= self.num_experts:
            raise ConfigError(f"experts_top_k {self.experts_top_k} must be in 1..num_experts ({self.num_experts})")

    @property
    def rotary_dim(self) -> int:
        """Number of leading channels of each head that RoPE rotates."""
        return int(self.head_dim * self.rope_fraction)

    # -- per-layer views -------------------------------------------------------------
    def layer_mixers(self) -> list[str]:
        """Mixer name of every layer (the pattern repeated cyclically)."""
        return [self.mixer_pattern[i % len(self.mixer_pattern)] for i in range(self.num_layers)]

    def layer_ffns(self) -> list[str]:
        """FFN name of every layer (the pattern repeated cyclically)."""
        return [self.ffn_pattern[i % len(self.ffn_pattern)] for i in range(self.num_layers)]

    # -- (de)serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from a dict, ignoring keys this version does not know."""
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:  # e.g. a list where an int belongs
            raise ConfigError(f"invalid model config: {exc}") from None

    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); fix or regenerate it") from None
        return cls.from_dict(data)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named preset (see :func:`preset_names`), with optional field overrides."""
        from .presets import PRESETS

        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
        return cls.from_dict({**PRESETS[name], **overrides})


def preset_names() -> list[str]:
    from .presets import PRESETS

    return sorted(PRESETS)
