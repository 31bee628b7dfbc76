"""The generic LanguageModel: cached decoding, trees, commit and padding against full forwards."""

import pytest
import torch

import nimblelm as nl
from nimblelm.cache import TreeSpec

from ..conftest import build, tiny_presets


@pytest.mark.parametrize("preset", tiny_presets())
def test_prefill_then_decode_equals_full_forward(preset):
    model = build(preset)
    tokens = torch.randint(0, model.config.vocab_size, (2, 21))
    full = model(tokens).logits
    cache = model.make_cache(2, 32)
    prefill = 5
    parts = [model(tokens[:, :prefill], cache=cache).logits]
    for t in range(prefill, tokens.shape[1]):
        parts.append(model(tokens[:, t:t + 1], cache=cache).logits)
    assert cache.length == tokens.shape[1]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("preset", tiny_presets())
def test_chunked_prefill_equals_full_forward(preset):
    model = build(preset)
    tokens = torch.randint(0, model.config.vocab_size, (1, 30))
    cache = model.make_cache(1, 30)
    parts = [model(tokens[:, a:b], cache=cache).logits for a, b in [(0, 7), (7, 19), (19, 30)]]
    torch.testing.assert_close(torch.cat(parts, 1), model(tokens).logits, rtol=1e-10, atol=1e-10)


def random_tree(n: int, generator: torch.Generator) -> TreeSpec:
    parents = [-1] + [int(torch.randint(-1, i, (1,), generator=generator)) for i in range(1, n)]
    return TreeSpec(torch.tensor(parents))


def path_to(tree: TreeSpec, node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = int(tree.parents[node])
    return path[::-1]


@pytest.mark.parametrize("preset", tiny_presets())
def test_tree_logits_equal_path_by_path(preset):
    model = build(preset)
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 256, (1, 9), generator=gen)
    tree = random_tree(10, gen)
    nodes = torch.randint(0, 256, (1, 10), generator=gen)
    cache = model.make_cache(1, 40)
    model(prefix, cache=cache)
    positions = (prefix.shape[1] + tree.depth)[None]
    tree_logits = model(nodes, positions, cache=cache, tree=tree).logits
    for node in range(10):
        path = path_to(tree, node)
        alone = model(torch.cat([prefix, nodes[:, path]], 1)).logits[:, -1]
        torch.testing.assert_close(tree_logits[:, node], alone, rtol=1e-10, atol=1e-10)


def assert_same_cache_contents(cache, fresh) -> None:
    """KV entries up to the length, and every recurrent state tensor, agree."""
    assert cache.length == fresh.length
    for mine, ref in zip(cache.states, fresh.states):
        if hasattr(ref, "k"):
            for a, b in ((mine.k, ref.k), (mine.v, ref.v)):
                torch.testing.assert_close(a[:, :, :cache.length], b[:, :, :fresh.length], rtol=0, atol=1e-12)
        if hasattr(ref, "tensors"):
            for name in ref.tensors:
                torch.testing.assert_close(mine.tensors[name], ref.tensors[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("preset", tiny_presets())
def test_commit_equals_fresh_prefill_of_kept_tokens(preset):
    model = build(preset)
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 256, (1, 12), generator=gen)
    tree = random_tree(8, gen)
    nodes = torch.randint(0, 256, (1, 8), generator=gen)
    leaf = int(tree.depth.argmax())
    path = path_to(tree, leaf)
    cache = model.make_cache(1, 40)
    model(prefix, cache=cache)
    model(nodes, (prefix.shape[1] + tree.depth)[None], cache=cache, tree=tree)
    cache.commit(path)
    kept = torch.cat([prefix, nodes[:, path]], 1)
    fresh = model.make_cache(1, 40)
    model(kept, cache=fresh)
    assert cache.length == kept.shape[1]
    assert_same_cache_contents(cache, fresh)
    nxt = torch.randint(0, 256, (1, 3), generator=gen)
    torch.testing.assert_close(model(nxt, cache=cache).logits, model(nxt, cache=fresh).logits)


@pytest.mark.parametrize("preset", tiny_presets())
def test_left_padded_batch_equals_each_alone(preset):
    model = build(preset)
    lengths = [11, 4, 7]
    width = max(lengths)
    rows = [torch.randint(0, 256, (n,)) for n in lengths]
    tokens = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.bool)
    for b, row in enumerate(rows):
        tokens[b, width - len(row):] = row
        mask[b, width - len(row):] = True
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    batched = model(tokens, positions, token_mask=mask).logits
    for b, row in enumerate(rows):
        alone = model(row[None]).logits[0]
        torch.testing.assert_close(batched[b, width - len(row):], alone, rtol=1e-10, atol=1e-10)


def test_cache_overflow_is_a_clear_error():
    model = build("attention-tiny")
    cache = model.make_cache(1, 8)
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(nl.CacheOverflowError, match="6 cached \\+ 3 new tokens exceed the 8 slots"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    assert cache.length == 6  # nothing was written


def test_logits_to_keep_and_hidden():
    model = build("attention-tiny")
    tokens = torch.randint(0, 256, (2, 9))
    full = model(tokens)
    last = model(tokens, logits_to_keep=2)
    assert full.hidden.shape == (2, 9, model.config.hidden_size)
    torch.testing.assert_close(last.logits, full.logits[:, -2:])
    torch.testing.assert_close(full.logits, full.hidden @ model.embed.weight.t())


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_logits_on_demand_equal_forward_logits(softcap):
    model = build("attention-tiny", logit_softcap=softcap).eval()
    tokens = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        full = model(tokens)
        bare = model(tokens, compute_logits=False)
        assert bare.logits is None
        torch.testing.assert_close(bare.hidden, full.hidden, rtol=0, atol=0)
        torch.testing.assert_close(model.head_logits(bare.hidden[1, [7, 2]]), full.logits[1, [7, 2]])
    assert model.computes_logits_on_demand


def test_mixer_pattern_makes_hybrids():
    cfg = nl.ModelConfig(num_layers=4, mixer_pattern=["attention", "local_attention"], sliding_window=4,
                         ffn_pattern=["mlp", "swiglu", "moe", "none"])
    model = nl.LanguageModel(cfg)
    names = [type(b.mixer).__name__ for b in model.blocks]
    assert names == ["Attention", "LocalAttention", "Attention", "LocalAttention"]
    assert [type(b.ffn).__name__ for b in model.blocks] == ["MLP", "SwiGLU", "MixtureOfExperts", "NoneType"]
    out = model(torch.randint(0, 256, (1, 5)))
    assert out.aux_loss is not None and out.aux_loss.ndim == 0


def test_unknown_mixer_is_a_clear_error():
    with pytest.raises(nl.ConfigError, match="unknown mixer 'foo'"):
        nl.LanguageModel(nl.ModelConfig(mixer_pattern=["foo"]))


def test_gemma_style_options_decode_consistently():
    """Partial rotary, norm offset, embedding scale, logit soft-cap, GeGLU with biases."""
    model = build("attention-tiny", rope_fraction=0.5, norm_offset=1.0, embedding_scale=8.0, logit_softcap=3.0,
                  hidden_act="gelu_tanh", ffn_bias=True, attention_out_bias=True)
    tokens = torch.randint(0, 256, (1, 12))
    full = model(tokens).logits
    assert full.abs().max() <= 3.0
    cache = model.make_cache(1, 12)
    parts = [model(tokens[:, :5], cache=cache).logits] + [model(tokens[:, t:t + 1], cache=cache).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)
    assert model.blocks[0].ffn.gate_proj.bias is not None and model.blocks[0].mixer.o_proj.bias is not None
    torch.testing.assert_close(model.norm.weight, torch.zeros(64, dtype=torch.float64))  # offset 1 + zeros


def test_inference_head_copy_follows_weight_updates():
    model = build("mlp-attention-tiny")  # untied head
    tokens = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        before = model(tokens).logits
        model.lm_head.weight.mul_(2.0)
        after = model(tokens).logits
    torch.testing.assert_close(after, 2 * before)
    torch.testing.assert_close(after, model(tokens).logits)  # autograd path agrees
