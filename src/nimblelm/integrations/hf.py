"""Hugging Face ``transformers`` integration: the ONLY module of nimblelm that imports transformers.

* :func:`from_hf` converts a transformers causal LM to a :class:`~nimblelm.LanguageModel` with
  the same logits. Converters are looked up by HF class name in :data:`CONVERTERS`; a mixer
  library adds its own with ``@register_converter("MambaForCausalLM")``, building a
  :class:`ModelConfig` and a name table for :func:`_copy_weights`.
* :func:`to_hf` exports a nimblelm model to transformers where the architecture exists there
  (attention + gated FFN -> ``LlamaForCausalLM``, biases and GeGLU included, or
  ``Qwen2ForCausalLM`` when only q/k/v have biases). Exporters are looked up by mixer name in
  :data:`EXPORTERS`.
* :class:`HFTarget` lets ``nl.generate`` decode with a transformers model directly, using
  transformers' own KV cache plus a 2-D attention mask for left-padded batches. Llama / Qwen2
  models also verify draft trees (every speculative strategy): one call over the tree tokens
  with a 4-D tree mask and per-node position ids, then :meth:`HFCache.commit` gathers the
  accepted nodes' keys/values. Models without tree support refuse speculative strategies.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch

from ..errors import CacheOverflowError, ConfigError, GenerationError
from ..models.config import ModelConfig
from ..models.lm import LanguageModel

try:
    import transformers
except ImportError as exc:  # pragma: no cover - exercised only without the extra installed
    raise ImportError("nimblelm.integrations.hf needs transformers: pip install 'nimblelm[hf]'") from exc

Converter = Callable[[object], LanguageModel]
Exporter = Callable[[LanguageModel], object]
CONVERTERS: dict[str, Converter] = {}  # HF class name -> converter
EXPORTERS: dict[str, Exporter] = {}  # nimblelm mixer name -> exporter


def register_converter(*hf_class_names: str) -> Callable[[Converter], Converter]:
    def add(fn: Converter) -> Converter:
        for name in hf_class_names:
            CONVERTERS[name] = fn
        return fn

    return add


def register_exporter(mixer_name: str) -> Callable[[Exporter], Exporter]:
    def add(fn: Exporter) -> Exporter:
        EXPORTERS[mixer_name] = fn
        return fn

    return add


def from_hf(hf_model) -> LanguageModel:
    """A nimblelm model with the weights (and logits) of a transformers causal LM."""
    name = type(hf_model).__name__
    if name not in CONVERTERS:
        raise NotImplementedError(f"no nimblelm converter for {name}; supported: {', '.join(sorted(CONVERTERS))}")
    return CONVERTERS[name](hf_model)


def to_hf(model: LanguageModel):
    """A transformers model with the weights (and logits) of a nimblelm model."""
    mixers = sorted(set(model.config.layer_mixers()))
    if len(mixers) != 1 or mixers[0] not in EXPORTERS:
        raise NotImplementedError(f"no transformers architecture for a model with mixers {mixers}; "
                                  f"to_hf exports models whose every layer is one of: {', '.join(sorted(EXPORTERS))}")
    return EXPORTERS[mixers[0]](model)


# -- weight tables ----------------------------------------------------------------------------
# nimblelm name -> transformers name, per layer ({i} = layer index) and global.
_LLAMA_LAYER = {
    "mixer_norm.weight": "input_layernorm.weight",
    "mixer.q_proj.weight": "self_attn.q_proj.weight",
    "mixer.k_proj.weight": "self_attn.k_proj.weight",
    "mixer.v_proj.weight": "self_attn.v_proj.weight",
    "mixer.o_proj.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.gate_proj.weight": "mlp.gate_proj.weight",
    "ffn.up_proj.weight": "mlp.up_proj.weight",
    "ffn.down_proj.weight": "mlp.down_proj.weight",
}
_QKV_BIAS = {f"mixer.{p}_proj.bias": f"self_attn.{p}_proj.bias" for p in "qkv"}
_OUT_BIAS = {"mixer.o_proj.bias": "self_attn.o_proj.bias"}
_FFN_BIAS = {f"ffn.{p}_proj.bias": f"mlp.{p}_proj.bias" for p in ("gate", "up", "down")}
# transformers hidden_act -> nimblelm hidden_act (of the gated FFN)
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}


def _llama_name_map(config: ModelConfig) -> dict[str, str]:
    layer = dict(_LLAMA_LAYER)
    for enabled, extra in ((config.attention_bias, _QKV_BIAS), (config.attention_out_bias, _OUT_BIAS),
                           (config.ffn_bias, _FFN_BIAS)):
        layer.update(extra if enabled else {})
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(config.num_layers):
        names.update({f"blocks.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in layer.items()})
    return names


@torch.no_grad()
def _copy_weights(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor], names: dict[str, str]) -> None:
    """dst[name] <- src[names[name]] for every entry (names maps dst names to src names)."""
    for dst_name, src_name in names.items():
        if src_name not in src or dst_name not in dst:
            raise ConfigError(f"weight {src_name!r} -> {dst_name!r} is missing; the model does not match its config")
        if src[src_name].shape != dst[dst_name].shape:
            raise ConfigError(f"weight {src_name} has shape {tuple(src[src_name].shape)}, "
                              f"expected {tuple(dst[dst_name].shape)}")
        dst[dst_name].copy_(src[src_name])


# -- transformers -> nimblelm ------------------------------------------------------------------
def _rope_theta(cfg) -> float:
    """rope_theta of a config with plain RoPE; refuses scaled variants (linear, dynamic, yarn,
    llama3, longrope...). Llama/Qwen2 rotate whole heads whatever partial_rotary_factor says."""
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if params and not any(k in params for k in ("rope_type", "type", "rope_theta")):
        raise NotImplementedError(f"per-layer-type rope_parameters {sorted(params)} are not supported by nimblelm")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise NotImplementedError(f"RoPE scaling type {rope_type!r} is not implemented in nimblelm "
                                  "(only plain RoPE, rope_type 'default'); remove rope_scaling to convert")
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _llama_like_features(cfg, arch: str) -> dict:
    """ModelConfig fields for the options of a Llama / Qwen2 config; refuses what nimblelm's
    attention + gated-FFN blocks do not reproduce."""
    act = getattr(cfg, "hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise NotImplementedError(f"hidden_act {act!r} is not supported; nimblelm's gated FFN implements "
                                  f"{', '.join(_ACTIVATIONS)}")
    sliding = [t for t in (getattr(cfg, "layer_types", None) or []) if t != "full_attention"]
    if sliding or (getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None)):
        raise NotImplementedError(f"sliding-window attention layers ({sorted(set(sliding)) or 'use_sliding_window'}) "
                                  "are not supported by the Llama/Qwen2 converter; use a full-attention config")
    if arch == "qwen2":  # q/k/v biases always, nothing else
        return dict(attention_bias=True, attention_out_bias=False, ffn_bias=False, hidden_act=_ACTIVATIONS[act])
    bias = bool(getattr(cfg, "attention_bias", False))  # Llama: q, k, v AND o
    return dict(attention_bias=bias, attention_out_bias=bias, ffn_bias=bool(getattr(cfg, "mlp_bias", False)),
                hidden_act=_ACTIVATIONS[act])


def _tied(hf_model) -> bool:
    out, emb = hf_model.get_output_embeddings(), hf_model.get_input_embeddings()
    return out is None or out.weight.data_ptr() == emb.weight.data_ptr()


@register_converter("LlamaForCausalLM", "Qwen2ForCausalLM")
def _from_llama_like(hf_model) -> LanguageModel:
    cfg = hf_model.config
    arch = "qwen2" if type(hf_model).__name__ == "Qwen2ForCausalLM" else "llama"
    config = ModelConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size, mixer_pattern=["attention"], ffn_pattern=["swiglu"],
        max_seq_len=cfg.max_position_embeddings, rope_theta=_rope_theta(cfg), norm_eps=cfg.rms_norm_eps,
        tie_embeddings=_tied(hf_model), initializer_range=getattr(cfg, "initializer_range", 0.02),
        **_llama_like_features(cfg, arch))
    reference = next(hf_model.parameters())
    model = LanguageModel(config).to(device=reference.device, dtype=reference.dtype)
    _copy_weights(hf_model.state_dict(), model.state_dict(), _llama_name_map(config))
    return model.eval()


# -- nimblelm -> transformers ------------------------------------------------------------------
def _check_exportable(config: ModelConfig) -> None:
    """Refuse nimblelm options that Llama / Qwen2 in transformers cannot express."""
    if config.layer_ffns() != ["swiglu"] * config.num_layers:
        raise NotImplementedError(f"to_hf exports gated (SwiGLU) FFNs only; this model has {sorted(set(config.layer_ffns()))}")
    unsupported = {"attn_output_gate (gated attention)": config.attn_output_gate,
                   f"rope_fraction {config.rope_fraction} (partial rotary)": config.rope_fraction != 1.0,
                   f"norm_offset {config.norm_offset}": config.norm_offset != 0.0,
                   f"embedding_scale {config.embedding_scale}": config.embedding_scale is not None,
                   f"logit_softcap {config.logit_softcap}": config.logit_softcap is not None,
                   "attention_out_bias without attention_bias": config.attention_out_bias and not config.attention_bias,
                   "attention_bias (q/k/v only, Qwen2 style) together with ffn_bias":
                       config.attention_bias and not config.attention_out_bias and config.ffn_bias}
    found = [name for name, used in unsupported.items() if used]
    if found:
        raise NotImplementedError(f"{', '.join(found)} has no transformers Llama/Qwen2 equivalent; to_hf cannot export it")


@register_exporter("attention")
def _to_llama_like(model: LanguageModel):
    config = model.config
    _check_exportable(config)
    act = {ours: theirs for theirs, ours in _ACTIVATIONS.items() if theirs != "swish"}[config.hidden_act]
    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                  num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                  head_dim=config.head_dim, max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
                  rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings, hidden_act=act,
                  initializer_range=config.initializer_range, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
    if config.attention_bias and not config.attention_out_bias:  # q/k/v biases only: Qwen2
        hf_config = transformers.Qwen2Config(**common, use_sliding_window=False)
        cls = transformers.Qwen2ForCausalLM
    else:
        hf_config = transformers.LlamaConfig(**common, attention_bias=config.attention_bias, mlp_bias=config.ffn_bias)
        cls = transformers.LlamaForCausalLM
    reference = next(model.parameters())
    hf_model = cls(hf_config).to(device=reference.device, dtype=reference.dtype)
    if config.tie_embeddings and not _tied(hf_model):
        hf_model.tie_weights()
    names = _llama_name_map(config)
    _copy_weights(model.state_dict(), hf_model.state_dict(), {theirs: ours for ours, theirs in names.items()})
    return hf_model.eval()


# -- generation adapter --------------------------------------------------------------------------
@dataclass
class _HFOutput:
    logits: torch.Tensor  # [B, kept, V]
    hidden: torch.Tensor  # [B, n, hidden] after the final norm


def cache_keyword(hf_model) -> str | None:
    """The ``forward`` keyword that carries transformers' cache in the installed version:
    ``"cache"`` (transformers 5.25 on, every model), else ``"past_key_values"`` (attention models)
    or ``"cache_params"`` (Mamba, Mamba-2); None when the model takes no cache."""
    accepted = inspect.signature(hf_model.forward).parameters
    return next((name for name in ("cache", "past_key_values", "cache_params") if name in accepted), None)


def returned_cache(out):
    """The cache a transformers forward returned (``out.cache`` from 5.25 on, ``past_key_values``
    or ``cache_params`` before), or None."""
    for name in ("cache", "past_key_values", "cache_params"):
        if name in out.keys():
            return out[name]
    return None


def keeps_recurrent_state(hf_model) -> bool:
    """Whether the model's cache holds recurrent state (Mamba, Mamba-2, RecurrentGemma's RG-LRU
    layers) rather than only attention keys/values: such a cache cannot be gathered to a tree path."""
    if "cache_params" in inspect.signature(hf_model.forward).parameters:
        return True  # before 5.25: the recurrent models' own cache classes
    recurrent_layer = getattr(transformers.cache_utils, "LinearAttentionCacheLayerMixin", None)
    if recurrent_layer is None or "cache" not in inspect.signature(hf_model.forward).parameters:
        return False
    try:
        layers = transformers.DynamicCache(config=hf_model.config).layers
    except (TypeError, ValueError, AttributeError):  # a config DynamicCache cannot lay out: decided by its first call
        return False
    return any(isinstance(layer, recurrent_layer) for layer in layers)


class HFCache:
    """transformers' own cache (a DynamicCache, created by the model on the first call) plus the
    2-D attention mask over every committed slot (0 at left padding), the committed slot count
    ``length`` and the ``pending`` draft-tree tokens of the last tree call.

    Calls without a tree commit at once. After a tree call the DynamicCache holds ``length +
    pending`` entries per layer until :meth:`commit` keeps the accepted nodes: their keys/values
    are gathered to slots ``[length, length + len(keep))`` and the rest dropped, so the cache then
    equals a fresh prefill of the committed tokens."""

    def __init__(self, batch: int, max_len: int, device):
        self.batch, self.max_len, self.length, self.pending = batch, max_len, 0, 0
        self.past = None  # a transformers Cache (DynamicCache) after the first call
        self.mask = torch.zeros(batch, 0, dtype=torch.long, device=device)

    def commit(self, keep=None) -> None:
        """Keep the pending tree nodes ``keep`` (indices among the last call's tokens, in order;
        None = all of them). Without pending tokens there is nothing to do."""
        if not self.pending:
            if keep is not None and len(keep):
                raise GenerationError(f"nothing to commit: the last call had no draft tree, got keep={list(keep)}")
            return
        n, start = self.pending, self.length
        keep = list(range(n)) if keep is None else [int(i) for i in keep]
        if any(not 0 <= i < n for i in keep):
            raise GenerationError(f"commit indices must lie in [0, {n}), got {keep}")
        if self.past.get_seq_length() != start + n:
            raise GenerationError(f"the transformers cache holds {self.past.get_seq_length()} entries, expected "
                                  f"{start} committed + {n} pending; was it used outside nimblelm?")
        for layer in self.past.layers:
            layer.keys, layer.values = _keep_slots(layer.keys, start, keep), _keep_slots(layer.values, start, keep)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.batch, len(keep))], dim=1)
        self.length, self.pending = start + len(keep), 0


def _keep_slots(states: torch.Tensor, start: int, keep: list[int]) -> torch.Tensor:
    """states [B, H, start + n, D] -> [B, H, start + len(keep), D]: slots before ``start`` and
    then slots ``start + keep`` (a view when ``keep`` is 0, 1, ..., k-1)."""
    if keep == list(range(len(keep))):
        return states[:, :, : start + len(keep)]
    index = torch.tensor(keep, dtype=torch.long, device=states.device) + start
    return torch.cat([states[:, :, :start], states.index_select(2, index)], dim=2)


def tree_attention_mask(prefix_mask: torch.Tensor, tree, dtype: torch.dtype) -> torch.Tensor:
    """The 4-D additive mask [B, 1, n, L + n] of a tree call: 0 where a node may attend, the
    dtype's most negative value elsewhere. Node i sees every real cached slot (``prefix_mask``
    [B, L], 0 at left padding) and the tree nodes of ``tree.ancestor_mask`` row i (its ancestors
    and itself)."""
    batch, prefix = prefix_mask.shape
    ancestors = tree.ancestor_mask.to(prefix_mask.device)
    n = ancestors.shape[0]
    allowed = torch.cat([prefix_mask.bool()[:, None, :].expand(batch, n, prefix),
                         ancestors[None].expand(batch, n, n)], dim=2)
    mask = torch.zeros(batch, 1, n, prefix + n, dtype=dtype, device=prefix_mask.device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


class HFTarget:
    """A transformers causal LM behind nimblelm's target protocol (see nimblelm.generation.generate).

    Draft-tree verification (``tree=``) is declared per transformers ``model_type`` in
    :attr:`TREE_MODEL_TYPES`: models whose attention adds a custom 4-D mask as is, rotates by the
    given ``position_ids`` and appends to a DynamicCache, with ``eager`` or ``sdpa`` attention
    (the kernels that honour such a mask) and no sliding-window layers. Other models (Mamba,
    Mamba-2, ...: no tree mask, one recurrent state per call) refuse speculative strategies
    before any work, naming the alternatives (``tree_refusal``). For those model types the
    target also exposes ``embed``, ``head_weight`` and ``_head_logits`` like a nimblelm model, so
    feature drafters (Medusa, Hydra, EAGLE heads) run on it."""

    TREE_MODEL_TYPES = frozenset({"llama", "qwen2"})
    TREE_ATTENTION = frozenset({"eager", "sdpa"})
    supports_tree = False

    def __init__(self, hf_model):
        self.model = hf_model.eval()
        cfg = hf_model.config
        head = hf_model.get_output_embeddings()
        vocab = head.weight.shape[0] if head is not None else cfg.vocab_size
        context = (getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
                   or getattr(cfg, "max_seq_len", None) or 1 << 30)  # recurrent models have no limit
        self.config = SimpleNamespace(vocab_size=vocab, max_seq_len=context, hidden_size=getattr(cfg, "hidden_size", None),
                                      logit_softcap=None, embedding_scale=None)
        if getattr(cfg, "model_type", None) in self.TREE_MODEL_TYPES:  # plain embedding, head without bias
            self.embed, self.head_weight = hf_model.get_input_embeddings(), head.weight  # for draft heads
        self._keeps_logits = "logits_to_keep" in inspect.signature(hf_model.forward).parameters
        self._cache_keyword = cache_keyword(hf_model)
        self._has_kv_cache = self._cache_keyword is not None and not keeps_recurrent_state(hf_model)
        self.tree_refusal = self._tree_refusal()
        self.supports_tree = self.tree_refusal is None

    def _tree_refusal(self) -> str | None:
        """Why this model cannot verify draft trees, with what to do instead; None if it can."""
        cfg, name = self.model.config, type(self.model).__name__
        model_type, impl = getattr(cfg, "model_type", None), getattr(cfg, "_attn_implementation", None)
        sliding = sorted({t for t in (getattr(cfg, "layer_types", None) or []) if t != "full_attention"})
        if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
            sliding = sliding or ["use_sliding_window"]
        if model_type not in self.TREE_MODEL_TYPES:
            why = (f"transformers {name} (model_type {model_type!r}) has no draft-tree verification in nimblelm "
                   f"(implemented for model types {', '.join(sorted(self.TREE_MODEL_TYPES))})")
        elif impl not in self.TREE_ATTENTION:
            return (f"{name} runs attn_implementation={impl!r}, which does not honour a custom tree mask; load it "
                    "with attn_implementation='sdpa' or 'eager'")
        elif sliding:
            why = f"{name} has sliding-window attention layers ({', '.join(sliding)}), which the tree mask ignores"
        else:
            return None
        if name in CONVERTERS:
            return f"{why}; convert it with nimblelm.integrations.hf.from_hf(hf_model): nimblelm's model verifies trees"
        return why

    def parameters(self):
        return self.model.parameters()

    def _head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, D] (after the final norm, as returned) -> logits [B, T, V]: the LM head,
        for Medusa / Hydra / EAGLE heads that read the target's features (Llama / Qwen2 only)."""
        return self.model.get_output_embeddings()(hidden)

    def make_cache(self, batch: int, max_len: int) -> HFCache:
        return HFCache(batch, max_len, next(self.model.parameters()).device)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache: HFCache | None = None,
                 tree=None, token_mask: torch.Tensor | None = None, logits_to_keep: int = 0) -> _HFOutput:
        """Score ``tokens`` [B, n] at ``positions`` [B, n] (default: after the cached slots).
        With ``tree`` (a TreeSpec over the n tokens) node i attends to the cache and its tree
        ancestors only; its keys/values stay pending in ``cache`` until ``cache.commit(keep)``."""
        if tokens.dim() != 2:
            raise GenerationError(f"tokens must have shape [batch, length], got {tuple(tokens.shape)}")
        batch, n = tokens.shape
        if cache is not None and cache.pending:
            raise GenerationError("the cache holds uncommitted tokens from a tree call; call cache.commit(path) first")
        if cache is not None and not self._has_kv_cache:
            raise GenerationError(f"transformers {type(self.model).__name__} keeps recurrent state in its cache "
                                  "(cache_params / linear-attention cache layers), which nimblelm's transformers "
                                  "adapter does not drive; convert the model with "
                                  "nimblelm.integrations.hf.from_hf(hf_model) to generate with it")
        past_len = cache.length if cache is not None else 0
        if cache is not None and past_len + n > cache.max_len:
            raise CacheOverflowError(f"cache overflow: {past_len} cached + {n} new tokens exceed the "
                                     f"{cache.max_len} slots allocated; allocate a larger cache")
        prefix_mask = cache.mask if cache is not None else torch.zeros(batch, 0, dtype=torch.long, device=tokens.device)
        if tree is None:
            if positions is None:
                positions = torch.arange(past_len, past_len + n, device=tokens.device).expand(batch, n)
            new_mask = torch.ones_like(tokens) if token_mask is None else token_mask.long()
            attention_mask = torch.cat([prefix_mask, new_mask], dim=1)
        else:
            self._check_tree_call(tree, n, token_mask)
            attention_mask = tree_attention_mask(prefix_mask, tree, next(self.model.parameters()).dtype)
            if positions is None:
                positions = (tree.depth.to(tokens.device) + past_len).expand(batch, n)
        out = self._forward(tokens, positions, attention_mask, cache, logits_to_keep)
        if cache is not None:
            cache.past = returned_cache(out)
            if tree is None:
                cache.mask, cache.length = attention_mask, past_len + n
            else:
                cache.pending = n
        logits = out.logits[:, -logits_to_keep:] if logits_to_keep else out.logits
        return _HFOutput(logits=logits, hidden=out.hidden_states[-1])

    def _check_tree_call(self, tree, n: int, token_mask: torch.Tensor | None) -> None:
        if not self.supports_tree:
            raise GenerationError(f"draft-tree verification is not available: {self.tree_refusal}")
        if len(tree) != n:
            raise GenerationError(f"the draft tree has {len(tree)} nodes but {n} tokens were given")
        if token_mask is not None and not bool(token_mask.all()):
            raise GenerationError("a draft-tree call cannot contain padding tokens (token_mask must be all True)")

    def _forward(self, tokens, positions, attention_mask, cache: HFCache | None, logits_to_keep: int):
        kwargs = dict(position_ids=positions, output_hidden_states=True, return_dict=True)
        if cache is not None:
            kwargs.update({self._cache_keyword: cache.past, "use_cache": True})
        else:
            kwargs.update(use_cache=False)
        if self._keeps_logits:
            kwargs["logits_to_keep"] = logits_to_keep
        return self.model(input_ids=tokens, attention_mask=attention_mask, **kwargs)


from . import hf_recurrent  # noqa: E402,F401  (registers the Mamba, Mamba-2 and RecurrentGemma converters)
