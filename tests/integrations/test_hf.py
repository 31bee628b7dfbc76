"""transformers <-> nimblelm: conversion both ways and nl.generate on transformers models."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import nimblelm as nl  # noqa: E402
from nimblelm.integrations import hf  # noqa: E402

from ..conftest import build  # noqa: E402

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
            initializer_range=0.1)  # std 0.1: peaked logits, so greedy ties are impossible in practice
ARCHS = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
         "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}


def make_hf(arch: str, tied: bool, seed: int = 0, **overrides):
    config_cls, model_cls = ARCHS[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY, **overrides}, tie_word_embeddings=tied)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # HF inits these to 0 / 1; make them matter
                p.add_(0.1 * torch.randn_like(p))
    return model


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_from_hf_and_back_match_logits(arch, tied):
    hf_model = make_hf(arch, tied)
    ours = hf.from_hf(hf_model)
    assert ours.config.tie_embeddings == tied and ours.config.attention_bias == (arch == "qwen2")
    assert not ours.config.attention_out_bias and not ours.config.ffn_bias
    assert ours.config.max_seq_len == 512 and ours.config.num_kv_heads == 2
    tokens = torch.randint(0, 256, (2, 19))
    expected = logits(hf_model, tokens)
    assert max_diff(ours(tokens).logits.detach(), expected) < 1e-5
    back = hf.to_hf(ours)
    assert type(back) is type(hf_model)
    assert max_diff(logits(back, tokens), expected) < 1e-5


def test_llama_biases_and_gelu_convert_both_ways():
    hf_model = make_hf("llama", tied=False, attention_bias=True, mlp_bias=True, hidden_act="gelu_pytorch_tanh",
                       head_dim=32, rope_theta=5e5)
    ours = hf.from_hf(hf_model)
    cfg = ours.config
    assert (cfg.attention_bias, cfg.attention_out_bias, cfg.ffn_bias, cfg.hidden_act) == (True, True, True, "gelu_tanh")
    assert cfg.head_dim == 32 and cfg.rope_theta == 5e5
    tokens = torch.randint(0, 256, (2, 11))
    expected = logits(hf_model, tokens)
    assert max_diff(ours(tokens).logits.detach(), expected) < 1e-5
    back = hf.to_hf(ours)
    assert type(back) is transformers.LlamaForCausalLM and back.config.mlp_bias and back.config.attention_bias
    assert max_diff(logits(back, tokens), expected) < 1e-5


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True, "tie_embeddings": False, "rope_theta": 5e5}])
def test_nimblelm_preset_to_hf_matches(overrides):
    model = build("attention-tiny", dtype=torch.float32, **overrides)
    hf_model = hf.to_hf(model)
    expected_cls = transformers.Qwen2ForCausalLM if overrides else transformers.LlamaForCausalLM
    assert type(hf_model) is expected_cls
    tokens = torch.randint(0, 256, (3, 21))
    assert max_diff(logits(hf_model, tokens), model(tokens).logits.detach()) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_on_hf_model_equals_converted_and_hf_generate(arch):
    hf_model = make_hf(arch, tied=arch == "llama", seed=1)
    prompt = torch.randint(0, 256, (13,))
    direct = nl.generate(hf_model, prompt.tolist(), max_new_tokens=24)
    converted = nl.generate(hf.from_hf(hf_model), prompt.tolist(), max_new_tokens=24)
    reference = hf_model.generate(prompt[None], attention_mask=torch.ones(1, 13, dtype=torch.long),
                                  do_sample=False, max_new_tokens=24, min_new_tokens=24, pad_token_id=0)
    assert direct.tokens.tolist() == converted.tokens.tolist() == reference[:, 13:].tolist()
    assert direct.stats.target_calls == 24


def test_hf_batched_left_padded_prompts_equal_one_by_one():
    hf_model = make_hf("qwen2", tied=False, seed=2)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (4, 12, 7)]
    batched = nl.generate(hf_model, prompts, max_new_tokens=10)
    for b, prompt in enumerate(prompts):
        assert batched.tokens[b].tolist() == nl.generate(hf_model, prompt, max_new_tokens=10).tokens[0].tolist()


def test_hf_target_protocol():
    hf_model = make_hf("llama", tied=True)
    target = hf.HFTarget(hf_model)
    assert target.config.vocab_size == 256 and target.config.max_seq_len == 512
    tokens = torch.randint(0, 256, (2, 9))
    full = target(tokens, torch.arange(9).expand(2, 9))
    assert full.logits.shape == (2, 9, 256) and full.hidden.shape == (2, 9, 64)
    cache = target.make_cache(2, 10)
    first = target(tokens[:, :5], torch.arange(5).expand(2, 5), cache=cache, logits_to_keep=1)
    second = target(tokens[:, 5:], torch.arange(5, 9).expand(2, 4), cache=cache, logits_to_keep=2)
    assert first.logits.shape == (2, 1, 256) and second.logits.shape == (2, 2, 256)
    assert max_diff(second.logits, full.logits[:, -2:]) < 1e-5 and max_diff(second.hidden, full.hidden[:, 5:]) < 1e-5
    with pytest.raises(nl.CacheOverflowError, match="larger cache"):
        target(tokens[:, :2], cache=cache)
    assert target.supports_tree  # tree calls: tests/integrations/test_hf_speculative.py


@pytest.mark.parametrize("arch, overrides, match", [
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE scaling type 'linear'"),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 128}}, "'llama3'"),
    ("llama", {"hidden_act": "relu"}, "hidden_act 'relu'"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}, "sliding-window"),
])
def test_unsupported_hf_configs_are_refused(arch, overrides, match):
    hf_model = make_hf(arch, tied=True, **overrides)
    with pytest.raises(NotImplementedError, match=match):
        hf.from_hf(hf_model)


def test_unsupported_class_and_exports_are_refused():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(NotImplementedError, match="no nimblelm converter for GPT2LMHeadModel"):
        hf.from_hf(gpt2)
    for preset, overrides, match in [
            ("gated-attention-tiny", {}, "attn_output_gate"), ("moe-tiny", {}, "SwiGLU"),
            ("mlp-attention-tiny", {}, "SwiGLU"), ("local-attention-tiny", {}, "local_attention"),
            ("attention-tiny", {"logit_softcap": 30.0, "norm_offset": 1.0}, "norm_offset 1.0, logit_softcap 30.0"),
            ("attention-tiny", {"rope_fraction": 0.5}, "partial rotary")]:
        with pytest.raises(NotImplementedError, match=match):
            hf.to_hf(build(preset, dtype=torch.float32, **overrides))
