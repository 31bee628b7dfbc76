"""transformers Mamba / Mamba-2 / RecurrentGemma -> nimblelm: same logits, same cached step,
same greedy tokens. Tiny random float32 HF models, every parameter moved away from its init."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import nimblelm as nl  # noqa: E402
from nimblelm.integrations import hf  # noqa: E402

NO_SPECIAL = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)
CONFIGS = {
    "mamba": (transformers.MambaConfig, transformers.MambaForCausalLM,
              dict(vocab_size=256, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4)),
    "mamba2": (transformers.Mamba2Config, transformers.Mamba2ForCausalLM,  # untied, 2 groups, 8 heads of 16
               dict(vocab_size=256, hidden_size=64, num_heads=8, head_dim=16, n_groups=2, state_size=8,
                    num_hidden_layers=2, expand=2, conv_kernel=4, chunk_size=8)),
    # hidden 48: sqrt(48) is not a bfloat16 number, so the embedding scale's rounding matters;
    # head_dim 12 with partial rotary 0.5; GQA 4:2; 2 recurrent blocks + 1 local attention (window 8)
    "recurrent_gemma": (transformers.RecurrentGemmaConfig, transformers.RecurrentGemmaForCausalLM,
                        dict(vocab_size=256, hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                             num_hidden_layers=3, intermediate_size=96, attention_window_size=8,
                             attention_bias=True, lru_width=64, tie_word_embeddings=False)),
}
FAMILIES = list(CONFIGS)


@torch.no_grad()
def randomise(model):
    """Every parameter away from its init: biases, norms, D, A_log, dt biases and Lambda matter."""
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.uniform_(-1.0, 1.0)
        elif name.endswith(("dt_bias", "dt_proj.bias")):
            p.normal_(-1.0, 0.5)
        elif name.endswith("recurrent_param"):
            p.add_(0.5 * torch.randn_like(p))
        elif name.endswith(".D"):
            p.normal_(0.0, 1.0)
        elif p.dim() < 2 or "norm" in name:
            p.add_(0.2 * torch.randn_like(p))
        elif "embed" in name or "conv" in name:
            p.normal_(0.0, (1.0 / p.shape[-1] ** 0.5) if "embed" in name else 0.5)
        else:  # std 1.5 / sqrt(fan_in): varied, peaked predictions
            p.normal_(0.0, 1.5 / p.shape[-2 if name.endswith("gate_weight") else -1] ** 0.5)
    return model


def make_hf(family: str, seed: int = 0, **overrides):
    config_cls, model_cls, fields = CONFIGS[family]
    torch.manual_seed(seed)
    return randomise(model_cls(config_cls(**{**fields, **NO_SPECIAL, **overrides})).float().eval())


@pytest.fixture(scope="module")
def pairs():
    """family -> (HF model, converted nimblelm model), built once."""
    out = {}
    for family in FAMILIES:
        hf_model = make_hf(family)
        out[family] = (hf_model, hf.from_hf(hf_model))
    return out


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def test_converters_are_registered():
    assert {"MambaForCausalLM", "Mamba2ForCausalLM", "RecurrentGemmaForCausalLM"} <= set(hf.CONVERTERS)


def test_converted_configs(pairs):
    mamba, mamba2, rg = (pairs[f][1].config for f in FAMILIES)
    assert mamba.layer_mixers() == ["mamba"] * 2 and mamba.ffn_pattern == ["none"] and mamba.tie_embeddings
    assert mamba.extra["dt_rank"] == 4 and mamba.state_size == 8 and mamba.norm_eps == 1e-5
    assert mamba2.layer_mixers() == ["mamba2"] * 2 and mamba2.ffn_pattern == ["none"] and not mamba2.tie_embeddings
    assert mamba2.extra == {"mamba_head_dim": 16, "n_groups": 2}
    assert rg.layer_mixers() == ["rglru", "rglru", "local_attention"] and rg.sliding_window == 8
    assert rg.embedding_scale == 6.9375 != 48 ** 0.5  # bfloat16(sqrt(48)), as transformers' normalizer
    assert (rg.norm_offset, rg.logit_softcap, rg.rope_fraction, rg.rotary_dim) == (1.0, 30.0, 0.5, 6)
    assert (rg.num_heads, rg.num_kv_heads, rg.head_dim, rg.intermediate_size) == (4, 2, 12, 48)
    assert rg.hidden_act == "gelu_tanh" and rg.ffn_bias and rg.attention_bias and rg.attention_out_bias
    assert rg.extra["lru_width"] == 64 and not rg.tie_embeddings


@pytest.mark.parametrize("family", FAMILIES)
def test_full_forward_matches(pairs, family):
    hf_model, ours = pairs[family]
    tokens = torch.randint(0, 256, (2, 21))  # longer than RecurrentGemma's window of 8
    with torch.no_grad():
        expected = hf_model(tokens).logits
        got = ours(tokens).logits
    assert expected.std() > 0.5  # not flat
    assert max_diff(got, expected) < 1e-4


def hf_prefill_then_step(hf_model, family, tokens):
    """Logits of the last token from transformers' own cache: prefill tokens[:, :-1], then one step
    (the cache keyword and returned field of the installed transformers version; explicit
    positions, which RecurrentGemma would otherwise derive from its attention layers' length)."""
    n = tokens.shape[1] - 1
    keyword = hf.cache_keyword(hf_model)
    with torch.no_grad():
        if family == "recurrent_gemma":  # keeps its recurrent states in the modules, KV in the cache
            past = transformers.DynamicCache(config=hf_model.config)
            positions = torch.arange(n + 1).expand(tokens.shape[0], n + 1)
            hf_model(tokens[:, :-1], use_cache=True, position_ids=positions[:, :-1], **{keyword: past})
            return hf_model(tokens[:, -1:], use_cache=True, position_ids=positions[:, -1:],
                            **{keyword: past}).logits[:, -1]
        out = hf_model(tokens[:, :-1], use_cache=True)
        return hf_model(tokens[:, -1:], use_cache=True, cache_position=torch.tensor([n]),
                        **{keyword: hf.returned_cache(out)}).logits[:, -1]


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_step_matches(pairs, family):
    hf_model, ours = pairs[family]
    tokens = torch.randint(0, 256, (2, 14))
    expected = hf_prefill_then_step(hf_model, family, tokens)
    with torch.no_grad():
        cache = ours.make_cache(2, 32)
        ours(tokens[:, :-1], cache=cache)
        got = ours(tokens[:, -1:], cache=cache).logits[:, -1]
        full = ours(tokens).logits[:, -1]
    assert max_diff(got, expected) < 1e-4
    assert max_diff(got, full) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches(pairs, family):
    hf_model, ours = pairs[family]
    prompt = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        expected = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                                     do_sample=False, pad_token_id=0)[:, prompt.shape[1]:]
    got = nl.generate(ours, prompt, max_new_tokens=10).tokens
    assert got.tolist() == expected.tolist()
    assert len(set(got[0].tolist())) > 2  # not a degenerate repetition


def test_mamba_without_conv_bias():
    hf_model = make_hf("mamba", seed=1, use_conv_bias=False, tie_word_embeddings=False, time_step_rank=6)
    ours = hf.from_hf(hf_model)
    assert not ours.config.tie_embeddings and ours.config.extra["dt_rank"] == 6
    assert all(b.mixer.conv_bias.abs().max() == 0 for b in ours.blocks)
    tokens = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert max_diff(ours(tokens).logits, hf_model(tokens).logits) < 1e-4


@pytest.mark.parametrize("family, overrides, feature", [
    ("mamba", dict(use_bias=True), "use_bias"),
    ("mamba", dict(hidden_act="gelu"), "hidden_act"),
    ("mamba2", dict(use_bias=True), "use_bias"),
    ("mamba2", dict(time_step_limit=(0.0, 0.1)), "time_step_limit"),
    ("recurrent_gemma", dict(hidden_activation="silu"), "hidden_activation"),
])
def test_unsupported_options_are_refused(family, overrides, feature):
    config_cls, model_cls, fields = CONFIGS[family]
    tiny = {**fields, **NO_SPECIAL, "num_hidden_layers": 1, **overrides}
    with pytest.raises(NotImplementedError, match=feature):
        hf.from_hf(model_cls(config_cls(**tiny)))
