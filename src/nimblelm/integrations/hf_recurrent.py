"""Converters from transformers' recurrent causal LMs to nimblelm: ``MambaForCausalLM``,
``Mamba2ForCausalLM`` and ``RecurrentGemmaForCausalLM`` (Griffin).

Registered in :data:`nimblelm.integrations.hf.CONVERTERS`, so ``hf.from_hf(hf_model)`` picks
them up. Only the HF model's ``.config`` attributes and ``state_dict()`` are read; this module
never imports transformers itself.

* Mamba / Mamba-2: every layer is ``norm -> mixer -> residual`` (no FFN, ``ffn_pattern
  ["none"]``); the depthwise conv weight ``[C, 1, K]`` becomes our ``conv_weight [C, K]``.
  transformers keeps the residual stream in float32 when ``residual_in_fp32`` (the default);
  nimblelm keeps it in the model dtype, which is the same thing for float32 models.
* RecurrentGemma: Gemma conventions (RMSNorm scaled by ``1 + weight``, embeddings multiplied by
  sqrt(hidden) rounded to bfloat16 as transformers' ``normalizer`` buffer is, soft-capped logits),
  ``layers_block_type`` -> mixers ``rglru`` / ``local_attention`` (window
  ``attention_window_size``), partial rotary (``partial_rotary_factor`` -> ``rope_fraction``),
  GeGLU MLP of width ``intermediate_size // 2`` with biases, attention output bias.
"""

from __future__ import annotations

import math

import torch

from ..models.config import ModelConfig
from ..models.lm import LanguageModel
from .hf import _copy_weights, _tied, register_converter

_NO_LIMIT = 1 << 30  # recurrent models have no context limit of their own


# -- shared helpers ------------------------------------------------------------------------------
def _refuse(arch: str, features: dict[str, bool]) -> None:
    """Raise NotImplementedError naming every HF option in ``features`` that is switched on."""
    found = [name for name, used in features.items() if used]
    if found:
        raise NotImplementedError(f"{arch}: {'; '.join(found)} not supported by nimblelm's converter")


def _dense_head_dim(hidden_size: int) -> int:
    """A valid (even) attention head size for models without attention layers (unused)."""
    return hidden_size + hidden_size % 2


def _source_weights(hf_model) -> dict[str, torch.Tensor]:
    """The HF state dict with depthwise conv weights [C, 1, K] flattened to our [C, K]."""
    src = dict(hf_model.state_dict())
    for name, tensor in list(src.items()):
        if name.endswith(("conv1d.weight", "conv_1d.weight")) and tensor.dim() == 3 and tensor.shape[1] == 1:
            src[name] = tensor[:, 0]
    return src


def _build(hf_model, config: ModelConfig, src: dict[str, torch.Tensor], names: dict[str, str]) -> LanguageModel:
    """A nimblelm model of ``config`` in the HF model's device/dtype, weights copied via ``names``
    (nimblelm name -> key of ``src``)."""
    reference = next(hf_model.parameters())
    model = LanguageModel(config).to(device=reference.device, dtype=reference.dtype)
    _copy_weights(src, model.state_dict(), names)
    return model.eval()


def _global_names(config: ModelConfig, embed: str, final_norm: str) -> dict[str, str]:
    names = {"embed.weight": embed, "norm.weight": final_norm}
    if not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


def _zero_conv_bias(src: dict[str, torch.Tensor], prefix: str, channels: int, reference: torch.Tensor) -> None:
    """use_conv_bias=False: our layers always have a conv bias; give them zeros."""
    src.setdefault(f"{prefix}.conv1d.bias", reference.new_zeros(channels))


# -- Mamba (S6) ----------------------------------------------------------------------------------
_MAMBA_LAYER = {"mixer.in_proj.weight": "in_proj.weight", "mixer.conv_weight": "conv1d.weight",
                "mixer.conv_bias": "conv1d.bias", "mixer.x_proj.weight": "x_proj.weight",
                "mixer.dt_proj.weight": "dt_proj.weight", "mixer.dt_proj.bias": "dt_proj.bias",
                "mixer.A_log": "A_log", "mixer.D": "D", "mixer.out_proj.weight": "out_proj.weight"}
_MAMBA2_LAYER = {"mixer.in_proj.weight": "in_proj.weight", "mixer.conv_weight": "conv1d.weight",
                 "mixer.conv_bias": "conv1d.bias", "mixer.dt_bias": "dt_bias", "mixer.A_log": "A_log",
                 "mixer.D": "D", "mixer.norm_weight": "norm.weight", "mixer.out_proj.weight": "out_proj.weight"}


def _expand(cfg, arch: str) -> int:
    expand = cfg.expand
    if int(expand) != expand:
        raise NotImplementedError(f"{arch}: a fractional expand ({expand}) is not supported; nimblelm's "
                                  "inner width is an integer multiple of hidden_size")
    return int(expand)


def _check_mamba_common(cfg, arch: str) -> None:
    _refuse(arch, {"use_bias=True (biases on in_proj / out_proj)": bool(getattr(cfg, "use_bias", False)),
                   f"hidden_act {getattr(cfg, 'hidden_act', 'silu')!r} (only 'silu' is implemented)":
                       getattr(cfg, "hidden_act", "silu") not in ("silu", "swish")})


def _mamba_like(hf_model, arch: str, mixer: str, layer_names: dict[str, str], **fields) -> LanguageModel:
    cfg = hf_model.config
    config = ModelConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers, num_heads=1,
        num_kv_heads=1, head_dim=_dense_head_dim(cfg.hidden_size), mixer_pattern=[mixer], ffn_pattern=["none"],
        max_seq_len=_NO_LIMIT, state_size=cfg.state_size, conv_size=cfg.conv_kernel, expand=_expand(cfg, arch),
        norm_eps=cfg.layer_norm_epsilon, tie_embeddings=_tied(hf_model),
        initializer_range=getattr(cfg, "initializer_range", 0.02), **fields)
    src = _source_weights(hf_model)
    reference = next(hf_model.parameters())
    names = _global_names(config, "backbone.embeddings.weight", "backbone.norm_f.weight")
    for i in range(config.num_layers):
        prefix = f"backbone.layers.{i}.mixer"
        channels = src[f"{prefix}.conv1d.weight"].shape[0]
        if not getattr(cfg, "use_conv_bias", True):
            _zero_conv_bias(src, prefix, channels, reference)
        names[f"blocks.{i}.mixer_norm.weight"] = f"backbone.layers.{i}.norm.weight"
        names.update({f"blocks.{i}.{ours}": f"{prefix}.{theirs}" for ours, theirs in layer_names.items()})
    return _build(hf_model, config, src, names)


@register_converter("MambaForCausalLM")
def _from_mamba(hf_model) -> LanguageModel:
    cfg = hf_model.config
    _check_mamba_common(cfg, "Mamba")
    return _mamba_like(hf_model, "Mamba", "mamba", _MAMBA_LAYER, extra={"dt_rank": int(cfg.time_step_rank)})


@register_converter("Mamba2ForCausalLM")
def _from_mamba2(hf_model) -> LanguageModel:
    cfg = hf_model.config
    _check_mamba_common(cfg, "Mamba2")
    low, high = (float(v) for v in cfg.time_step_limit)
    _refuse("Mamba2", {f"time_step_limit {tuple(cfg.time_step_limit)} (only (0.0, inf), no dt clamping)":
                       low > 0.0 or high != math.inf})
    if cfg.num_heads * cfg.head_dim != _expand(cfg, "Mamba2") * cfg.hidden_size:
        raise NotImplementedError(f"Mamba2: num_heads * head_dim ({cfg.num_heads} * {cfg.head_dim}) must equal "
                                  f"expand * hidden_size ({cfg.expand} * {cfg.hidden_size})")
    return _mamba_like(hf_model, "Mamba2", "mamba2", _MAMBA2_LAYER, chunk_size=cfg.chunk_size,
                       extra={"mamba_head_dim": cfg.head_dim, "n_groups": cfg.n_groups})


# -- RecurrentGemma (Griffin) --------------------------------------------------------------------
_RG_COMMON = {"mixer_norm.weight": "temporal_pre_norm.weight", "ffn_norm.weight": "channel_pre_norm.weight",
              **{f"ffn.{p}_proj.{t}": f"mlp_block.{p}_proj.{t}" for p in ("gate", "up", "down")
                 for t in ("weight", "bias")}}
_RG_RECURRENT = {**{f"mixer.linear_{p}.{t}": f"temporal_block.linear_{p}.{t}" for p in ("x", "y", "out")
                    for t in ("weight", "bias")},
                 "mixer.conv_weight": "temporal_block.conv_1d.weight", "mixer.conv_bias": "temporal_block.conv_1d.bias",
                 **{f"mixer.{p}": f"temporal_block.rg_lru.{p}" for p in (
                     "input_gate_weight", "input_gate_bias", "recurrent_gate_weight", "recurrent_gate_bias",
                     "recurrent_param")}}
_RG_ATTENTION = {**{f"mixer.{p}_proj.weight": f"temporal_block.{p}_proj.weight" for p in "qkvo"},
                 "mixer.o_proj.bias": "temporal_block.o_proj.bias"}
_RG_QKV_BIAS = {f"mixer.{p}_proj.bias": f"temporal_block.{p}_proj.bias" for p in "qkv"}
_RG_MIXERS = {"linear_attention": "rglru", "sliding_attention": "local_attention",
              "recurrent": "rglru", "attention": "local_attention"}


def _rg_rope(cfg) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) of a RecurrentGemma config; plain RoPE only."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    _refuse("RecurrentGemma", {f"RoPE type {rope_type!r} (only 'default')": rope_type != "default"})
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    fraction = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 0.5))
    return float(theta), float(fraction)


def _rg_config(hf_model) -> ModelConfig:
    cfg = hf_model.config
    act = getattr(cfg, "hidden_activation", "gelu_pytorch_tanh")
    unknown = sorted(set(cfg.layers_block_type) - set(_RG_MIXERS))
    _refuse("RecurrentGemma", {
        f"hidden_activation {act!r} (only 'gelu_pytorch_tanh'; the recurrent block's gate is fixed to it)":
            act != "gelu_pytorch_tanh",
        f"block types {unknown}": bool(unknown),
        "logits_soft_cap None": getattr(cfg, "logits_soft_cap", None) is None})
    theta, fraction = _rg_rope(cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    embedding_scale = float(torch.tensor(cfg.hidden_size ** 0.5, dtype=torch.bfloat16))  # HF's `normalizer`
    return ModelConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
        head_dim=head_dim, intermediate_size=cfg.intermediate_size // 2,
        mixer_pattern=[_RG_MIXERS[t] for t in cfg.layers_block_type], ffn_pattern=["swiglu"],
        max_seq_len=_NO_LIMIT, rope_theta=theta, rope_fraction=fraction, sliding_window=cfg.attention_window_size,
        attention_bias=bool(cfg.attention_bias), attention_out_bias=True, hidden_act="gelu_tanh", ffn_bias=True,
        conv_size=cfg.conv1d_width, norm_eps=cfg.rms_norm_eps, norm_offset=1.0, embedding_scale=embedding_scale,
        logit_softcap=float(cfg.logits_soft_cap), tie_embeddings=_tied(hf_model),
        initializer_range=getattr(cfg, "initializer_range", 0.02), extra={"lru_width": cfg.lru_width})


@register_converter("RecurrentGemmaForCausalLM")
def _from_recurrent_gemma(hf_model) -> LanguageModel:
    config = _rg_config(hf_model)
    names = _global_names(config, "model.embed_tokens.weight", "model.final_norm.weight")
    for i, mixer in enumerate(config.layer_mixers()):
        layer = dict(_RG_COMMON)
        if mixer == "rglru":
            layer.update(_RG_RECURRENT)
        else:
            layer.update(_RG_ATTENTION)
            layer.update(_RG_QKV_BIAS if config.attention_bias else {})
        names.update({f"blocks.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in layer.items()})
    return _build(hf_model, config, _source_weights(hf_model), names)
