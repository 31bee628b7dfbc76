"""Named model presets. Every architecture comes in two sizes:

* ``<name>-tiny``: a few hundred thousand parameters, for tests;
* ``<name>-small``: about 15M parameters (vocab 8192), for training on this machine.

The mixer library adds its own entries through :func:`register_architecture`.
"""

from __future__ import annotations

from typing import Any

TINY = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            intermediate_size=128, max_seq_len=512, num_experts=4, experts_top_k=2)
SMALL = dict(vocab_size=8192, hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2,
             intermediate_size=1024, max_seq_len=2048, num_experts=8, experts_top_k=2)

PRESETS: dict[str, dict[str, Any]] = {}


def register_architecture(name: str, tiny: dict[str, Any] | None = None,
                          small: dict[str, Any] | None = None, **common: Any) -> None:
    """Add ``name-tiny`` and ``name-small`` presets: the base sizes, then ``common``, then the
    size-specific overrides."""
    PRESETS[f"{name}-tiny"] = {**TINY, **common, **(tiny or {})}
    PRESETS[f"{name}-small"] = {**SMALL, **common, **(small or {})}


register_architecture("attention", mixer_pattern=["attention"], ffn_pattern=["swiglu"])
register_architecture("gated-attention", mixer_pattern=["attention"], ffn_pattern=["swiglu"],
                      attn_output_gate=True)
register_architecture("local-attention", mixer_pattern=["local_attention"], ffn_pattern=["swiglu"],
                      tiny=dict(sliding_window=8), small=dict(sliding_window=256))
register_architecture("moe", mixer_pattern=["attention"], ffn_pattern=["swiglu", "moe"],
                      tiny=dict(num_layers=4), small=dict(num_layers=6, intermediate_size=768))
register_architecture("mlp-attention", mixer_pattern=["attention"], ffn_pattern=["mlp"],
                      tie_embeddings=False, num_kv_heads=None)

# -- the mixer library: one preset per mixer (each with a SwiGLU FFN) ------------------------
for _mixer in ("linear_attn", "based", "retnet", "gla"):
    register_architecture(_mixer.replace("_", "-"), mixer_pattern=[_mixer], ffn_pattern=["swiglu"],
                          tiny=dict(chunk_size=8))

register_architecture("mamba2", mixer_pattern=["mamba2"], ffn_pattern=["none"],
                      tiny=dict(chunk_size=8, state_size=16, extra={"mamba_head_dim": 16}),
                      small=dict(num_layers=12, state_size=64, extra={"mamba_head_dim": 64}))
for _mixer in ("deltanet", "gated_deltanet"):
    register_architecture(_mixer.replace("_", "-"), mixer_pattern=[_mixer], ffn_pattern=["swiglu"],
                          tiny=dict(chunk_size=8))
register_architecture("gated-deltanet-hybrid", ffn_pattern=["swiglu"], tiny=dict(chunk_size=8, num_layers=4),
                      mixer_pattern=["gated_deltanet", "gated_deltanet", "gated_deltanet", "attention"],
                      small=dict(num_layers=8))
register_architecture("mamba", mixer_pattern=["mamba"], ffn_pattern=["none"],
                      tiny=dict(chunk_size=8), small=dict(num_layers=12))
register_architecture("rglru", mixer_pattern=["rglru"], ffn_pattern=["swiglu"], tiny=dict(chunk_size=8))
# Griffin: 2 RG-LRU blocks : 1 local attention, GeGLU MLPs (Gemma conventions as in RecurrentGemma)
register_architecture("griffin", mixer_pattern=["rglru", "rglru", "local_attention"], ffn_pattern=["swiglu"],
                      hidden_act="gelu_tanh", tiny=dict(chunk_size=8, num_layers=3, sliding_window=8),
                      small=dict(num_layers=6, sliding_window=512))
# Jamba: attention:Mamba 1:7 in blocks of 8, MoE every other layer, top-2 of 16 experts
register_architecture("jamba", mixer_pattern=["mamba"] * 4 + ["attention"] + ["mamba"] * 3,
                      ffn_pattern=["swiglu", "moe"], num_experts=16, experts_top_k=2,
                      tiny=dict(chunk_size=8, num_layers=8, hidden_size=32, intermediate_size=64),
                      small=dict(num_layers=8, hidden_size=256, num_heads=4, intermediate_size=512,
                                 moe_intermediate_size=256))
register_architecture("short-conv", mixer_pattern=["short_conv"], ffn_pattern=["swiglu"])
# Based: gated short convolutions, Taylor linear attention and exact sliding-window attention
register_architecture("based-hybrid", mixer_pattern=["short_conv", "based", "local_attention"],
                      ffn_pattern=["swiglu"], tiny=dict(num_layers=3, chunk_size=8, sliding_window=8),
                      small=dict(num_layers=6, sliding_window=64))
for _mixer in ("ttt_linear", "ttt_mlp"):
    register_architecture(_mixer.replace("_", "-"), mixer_pattern=[_mixer], ffn_pattern=["swiglu"],
                          tiny=dict(extra={"ttt_mini_batch": 4}))

# -- the shipped code models (trained by `nimblelm train lm` on the CPython stdlib corpus) ----
CODE = dict(vocab_size=8192, hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2, intermediate_size=768,
            max_seq_len=2048, tie_embeddings=True)
PRESETS["code-attn"] = {**CODE, "mixer_pattern": ["attention"], "ffn_pattern": ["swiglu"]}
# hybrid: Mamba-2 (SSD) layers with one attention layer in three, SwiGLU FFNs throughout
PRESETS["code-hybrid"] = {**CODE, "mixer_pattern": ["mamba2", "mamba2", "attention"], "ffn_pattern": ["swiglu"],
                          "state_size": 32, "expand": 2, "chunk_size": 64, "extra": {"mamba_head_dim": 32}}
