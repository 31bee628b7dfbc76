"""Speculative decoding with transformers targets: tree verification of Llama / Qwen2 models
through HFTarget (4-D tree mask, per-node position ids, DynamicCache gather on commit), and
refusal of models without tree support (Mamba, Mamba-2, GPT-2)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import nimblelm as nl  # noqa: E402
from nimblelm.generation.speculative.drafters import DraftModelDrafter, PromptLookupDrafter  # noqa: E402
from nimblelm.generation.speculative.drafters.dynamic_tree import DynamicTreeDrafter  # noqa: E402
from nimblelm.generation.speculative.drafters import EagleHead, HydraHeads, MedusaHeads  # noqa: E402
from nimblelm.integrations import hf  # noqa: E402

from ..drafters_util import noisy_copy  # noqa: E402
from .test_hf import make_hf, max_diff  # noqa: E402

# node: 0  1  2  3  4  5  6  7   (0 = root; 1, 2, 6 its children; 5 sits at depth 3)
PARENTS = [-1, 0, 0, 1, 1, 3, 0, 2]
HEADS = {"medusa": MedusaHeads, "hydra": HydraHeads, "eagle": EagleHead, "eagle2": EagleHead}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def hf_model(arch: str, dtype: torch.dtype, seed: int = 0, attn: str | None = None):
    model = make_hf(arch, tied=arch == "llama", seed=seed).to(dtype)
    if attn is not None:
        model.set_attn_implementation(attn)
    return model


def path_to(node: int) -> list[int]:
    path = [node]
    while PARENTS[path[-1]] >= 0:
        path.append(PARENTS[path[-1]])
    return path[::-1]


# -- the tree call itself ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch, dtype, attn", [("llama", torch.float64, "sdpa"), ("qwen2", torch.float64, "sdpa"),
                                               ("llama", torch.float32, "eager"), ("qwen2", torch.float32, "sdpa")])
def test_tree_logits_equal_each_path_decoded_alone(arch, dtype, attn):
    """One masked pass over the tree (after a cached prefix) == every node's path run alone."""
    model = hf_model(arch, dtype, attn=attn)
    target = hf.HFTarget(model)
    assert target.supports_tree and target.tree_refusal is None
    prefix = torch.randint(0, 256, (1, 6))
    tree_tokens = torch.randint(0, 256, (1, len(PARENTS)))
    spec = nl.TreeSpec(torch.tensor(PARENTS))
    cache = target.make_cache(1, 32)
    target(prefix, cache=cache)
    out = target(tree_tokens, (spec.depth + 6)[None], cache=cache, tree=spec)
    assert cache.length == 6 and cache.pending == len(PARENTS)
    for node in range(len(PARENTS)):
        alone = torch.cat([prefix, tree_tokens[:, path_to(node)]], dim=1)
        with torch.no_grad():
            ref = model(alone, output_hidden_states=True)
        assert max_diff(out.logits[0, node], ref.logits[0, -1]) < TOL[dtype], node
        assert max_diff(out.hidden[0, node], ref.hidden_states[-1][0, -1]) < TOL[dtype], node
    # without a cache the tree sees nothing before it; positions default to the node depths
    bare = target(tree_tokens, tree=spec)
    for node in (3, 5, 7):
        with torch.no_grad():
            ref = model(tree_tokens[:, path_to(node)]).logits[0, -1]
        assert max_diff(bare.logits[0, node], ref) < TOL[dtype]


def test_tree_call_after_left_padded_prefix_equals_unpadded_paths():
    """Batch of two, row 0 left-padded by 2: padded cache slots stay invisible to the tree."""
    model = hf_model("qwen2", torch.float64, seed=2)
    target = hf.HFTarget(model)
    prefix = torch.randint(0, 256, (2, 6))
    real = torch.ones(2, 6, dtype=torch.bool)
    real[0, :2] = False
    cache = target.make_cache(2, 32)
    target(prefix, (real.long().cumsum(1) - 1).clamp(min=0), cache=cache, token_mask=real)
    spec = nl.TreeSpec(torch.tensor(PARENTS))
    tree_tokens = torch.randint(0, 256, (2, len(PARENTS)))
    positions = real.sum(1, keepdim=True) + spec.depth[None]  # [2, n]: real prefix length + depth
    out = target(tree_tokens, positions, cache=cache, tree=spec)
    for row in range(2):
        for node in (0, 4, 5, 7):
            alone = torch.cat([prefix[row][real[row]], tree_tokens[row, path_to(node)]])[None]
            with torch.no_grad():
                ref = model(alone).logits[0, -1]
            assert max_diff(out.logits[row, node], ref) < 1e-10, (row, node)


def dynamic_cache_tensors(cache: hf.HFCache) -> list[torch.Tensor]:
    return [t for layer in cache.past.layers for t in (layer.keys, layer.values)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("keep", [[0, 2, 7], [0, 1, 3, 5], [0], []])
def test_commit_equals_fresh_prefill(arch, keep):
    """After commit(keep) the DynamicCache equals a prefill of prefix + kept tokens, and the next
    call sees exactly that."""
    model = hf_model(arch, torch.float64, seed=3)
    target = hf.HFTarget(model)
    prefix = torch.randint(0, 256, (1, 5))
    tree_tokens = torch.randint(0, 256, (1, len(PARENTS)))
    spec = nl.TreeSpec(torch.tensor(PARENTS))
    cache = target.make_cache(1, 32)
    target(prefix, cache=cache)
    target(tree_tokens, (spec.depth + 5)[None], cache=cache, tree=spec)
    with pytest.raises(nl.GenerationError, match="uncommitted"):
        target(prefix[:, :1], cache=cache)
    cache.commit(keep)
    kept = torch.cat([prefix, tree_tokens[:, keep]], dim=1)
    fresh = target.make_cache(1, 32)
    target(kept, cache=fresh)
    assert cache.length == fresh.length == 5 + len(keep) and cache.pending == 0
    assert torch.equal(cache.mask, fresh.mask)
    assert cache.past.get_seq_length() == 5 + len(keep)
    for ours, ref in zip(dynamic_cache_tensors(cache), dynamic_cache_tensors(fresh), strict=True):
        assert ours.shape == ref.shape and max_diff(ours, ref) < 1e-12
    nxt = torch.randint(0, 256, (1, 2))
    assert max_diff(target(nxt, cache=cache).logits, target(nxt, cache=fresh).logits) < 1e-10


def test_tree_call_errors():
    target = hf.HFTarget(hf_model("llama", torch.float32))
    spec = nl.TreeSpec(torch.tensor(PARENTS))
    cache = target.make_cache(1, 10)
    target(torch.randint(0, 256, (1, 3)), cache=cache)
    with pytest.raises(nl.GenerationError, match="8 nodes but 2 tokens"):
        target(torch.zeros(1, 2, dtype=torch.long), cache=cache, tree=spec)
    with pytest.raises(nl.CacheOverflowError, match="larger cache"):
        target(torch.zeros(1, 8, dtype=torch.long), cache=cache, tree=spec)
    with pytest.raises(nl.GenerationError, match="nothing to commit"):
        cache.commit([0])
    target(torch.zeros(1, 2, dtype=torch.long), cache=cache, tree=nl.TreeSpec.chain(2))
    with pytest.raises(nl.GenerationError, match=r"\[0, 2\)"):
        cache.commit([0, 2])


# -- greedy speculative == greedy autoregressive ---------------------------------------------------------
def drafters_for(model, dtype):
    perfect = hf.from_hf(model)
    return {"perfect": perfect, "between": noisy_copy(perfect, 0.3),
            "random": hf.from_hf(hf_model("llama", dtype, seed=99))}


@pytest.mark.parametrize("arch, dtype", [("llama", torch.float64), ("qwen2", torch.float32),
                                         pytest.param("llama", torch.float32, marks=pytest.mark.slow),
                                         pytest.param("qwen2", torch.float64, marks=pytest.mark.slow)])
def test_greedy_speculative_equals_autoregressive(arch, dtype):
    model = hf_model(arch, dtype, seed=1)
    prompt = torch.randint(0, 256, (7,)).tolist()
    expected = nl.generate(model, prompt, max_new_tokens=20).tokens
    for kind, draft in drafters_for(model, dtype).items():
        runs = {"sps": DraftModelDrafter(draft, 4), "tree": DynamicTreeDrafter(draft, depth=3, top_k=3, total_tokens=8)}
        for strategy, drafter in runs.items():
            res = nl.generate(model, prompt, max_new_tokens=20, strategy=strategy, drafter=drafter)
            assert torch.equal(res.tokens, expected), (kind, strategy)
            if kind == "perfect" and strategy == "sps":
                assert res.stats.accepted_per_call == 5.0  # tau = depth + 1: 4 drafts + the bonus, 4 rounds
            if kind == "random":
                assert res.stats.accepted_per_call < 1.5
    repetitive = prompt[:4] * 4
    expected = nl.generate(model, repetitive, max_new_tokens=20).tokens
    res = nl.generate(model, repetitive, max_new_tokens=20, strategy="lookup", drafter=PromptLookupDrafter(6))
    assert torch.equal(res.tokens, expected)


def test_hf_target_accepts_exactly_what_the_converted_target_accepts():
    """Same drafter, same tokens, same rounds: the HF target's tree verification behaves like the
    nimblelm model converted from it (whose tree calls are tested against path decoding)."""
    model = hf_model("qwen2", torch.float64, seed=4)
    converted = hf.from_hf(model)
    draft = noisy_copy(converted, 0.2, seed=5)
    prompt = torch.randint(0, 256, (9,)).tolist()
    for strategy, drafter in [("tree", DynamicTreeDrafter(draft, depth=4, top_k=4, total_tokens=12)),
                              ("sps", DraftModelDrafter(draft, 3))]:
        ours, ref = (nl.generate(m, prompt, max_new_tokens=24, strategy=strategy, drafter=drafter)
                     for m in (model, converted))
        assert torch.equal(ours.tokens, ref.tokens)
        assert (ours.stats.rounds, ours.stats.target_calls) == (ref.stats.rounds, ref.stats.target_calls)
        assert ours.stats.rounds < 24  # the drafter got something accepted


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_feature_head_strategies_on_hf_targets(arch):
    """Medusa / Hydra / EAGLE heads read the HF target's final-norm features and reuse its
    embedding and LM head: greedy output == autoregressive, and every round as on the converted
    model with the same heads."""
    model = hf_model(arch, torch.float64, seed=7)
    converted = hf.from_hf(model)
    prompt = torch.randint(0, 256, (7,)).tolist()
    expected = nl.generate(model, prompt, max_new_tokens=12).tokens
    for strategy, heads_cls in HEADS.items():
        torch.manual_seed(8)
        heads = heads_cls(64, 256)
        with torch.no_grad():
            for p in heads.parameters():
                p.add_(0.05 * torch.randn_like(p))
        ours, ref = (nl.generate(m, prompt, max_new_tokens=12, strategy=strategy, drafter=heads)
                     for m in (model, converted))
        assert torch.equal(ours.tokens, expected) and torch.equal(ref.tokens, expected), strategy
        assert ours.stats.rounds == ref.stats.rounds, strategy


def test_perfect_chain_tree_accepts_depth_plus_one_and_edge_cases():
    model = hf_model("llama", torch.float32, seed=2)
    perfect = hf.from_hf(model)
    prompt = [7]  # a one-token prompt: no prefill, the first tree call starts the DynamicCache
    free = nl.generate(model, prompt, max_new_tokens=20).tokens[0].tolist()
    chain = DynamicTreeDrafter(perfect, depth=3, top_k=1, total_tokens=3)  # a 3-token chain per round
    res = nl.generate(model, prompt, max_new_tokens=20, strategy="tree", drafter=chain)
    assert res.tokens[0].tolist() == free and res.stats.accepted_per_call == 4.0
    stop = free[5]
    ar = nl.generate(model, prompt, max_new_tokens=20, stop_tokens=[stop])
    spec = nl.generate(model, prompt, max_new_tokens=20, stop_tokens=[stop], strategy="sps", drafter=perfect)
    assert spec.sequences() == ar.sequences()
    assert nl.generate(model, prompt, max_new_tokens=3, strategy="sps", drafter=perfect).tokens[0].tolist() == free[:3]


def test_sampled_speculative_smoke():
    model = hf_model("qwen2", torch.float32, seed=6)
    draft = noisy_copy(hf.from_hf(model), 0.3)
    kwargs = dict(max_new_tokens=16, strategy="tree", drafter=DynamicTreeDrafter(draft, depth=3, top_k=3,
                                                                                  total_tokens=8),
                  temperature=0.8, top_k=20, seed=11)
    first, again = nl.generate(model, [1, 2, 3], **kwargs), nl.generate(model, [1, 2, 3], **kwargs)
    assert first.tokens.shape == (1, 16) and torch.equal(first.tokens, again.tokens)
    assert int(first.tokens.min()) >= 0 and int(first.tokens.max()) < 256
    assert first.stats.rounds <= 16


def test_watermarked_sampled_speculative_runs_like_the_converted_target():
    """Same seed, same drafter: the HF target and its conversion draw the same tokens (their
    processed distributions agree to ~1e-6 and the randomness is consumed identically).
    The drafter is a perturbed copy: with the target itself as drafter, p/q sits at 1 +- 1e-7
    and whether a coin is drawn at all would hinge on rounding."""
    model = hf_model("llama", torch.float32, seed=3)
    converted = hf.from_hf(model)
    wm = nl.watermark.SynthID(keys=[11, 22, 33, 44], ngram_len=3)
    kwargs = dict(max_new_tokens=12, temperature=0.7, watermark=wm, strategy="sps",
                  drafter=noisy_copy(converted, 0.3), seed=5)
    ours, ref = nl.generate(model, [1, 2, 3], **kwargs), nl.generate(converted, [1, 2, 3], **kwargs)
    assert torch.equal(ours.tokens, ref.tokens) and ours.stats.rounds == ref.stats.rounds


# -- refusals ------------------------------------------------------------------------------------------
def tiny_mamba(cls_name: str):
    configs = {"MambaForCausalLM": (transformers.MambaConfig, dict(state_size=8, expand=2, conv_kernel=4)),
               "Mamba2ForCausalLM": (transformers.Mamba2Config, dict(num_heads=8, head_dim=16, n_groups=2,
                                                                     state_size=8, expand=2, chunk_size=8))}
    config_cls, extra = configs[cls_name]
    config = config_cls(vocab_size=256, hidden_size=64, num_hidden_layers=1, pad_token_id=None, bos_token_id=None,
                        eos_token_id=None, **extra)
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(config).float().eval()


@pytest.mark.parametrize("cls_name", ["MambaForCausalLM", "Mamba2ForCausalLM"])
def test_hf_mamba_refuses_every_strategy_before_any_work(cls_name):
    model = tiny_mamba(cls_name)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    converted = hf.from_hf(model)
    for strategy, drafter in [("sps", converted), ("tree", converted), ("lookup", None),
                              ("medusa", MedusaHeads(64, 256))]:
        with pytest.raises(nl.GenerationError, match=rf"'{strategy}' needs a target that verifies draft trees; "
                                                     rf"transformers {cls_name} .*from_hf\(hf_model\)"):
            nl.generate(model, [1, 2, 3], max_new_tokens=4, strategy=strategy, drafter=drafter)
    assert not calls
    with pytest.raises(nl.GenerationError, match="cache_params.*from_hf"):  # and no silent cacheless decoding
        nl.generate(model, [1, 2, 3], max_new_tokens=4)
    # the alternative the message names does work: the converted model verifies trees
    expected = nl.generate(converted, [1, 2, 3], max_new_tokens=6).tokens
    assert torch.equal(nl.generate(converted, [1, 2, 3], max_new_tokens=6, strategy="sps", drafter=converted).tokens,
                       expected)


def test_other_unsupported_hf_targets_are_refused():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    target = hf.HFTarget(gpt2)
    assert not target.supports_tree and "model_type 'gpt2'" in target.tree_refusal
    assert "from_hf" not in target.tree_refusal  # no converter for GPT-2: not suggested
    with pytest.raises(nl.GenerationError, match="draft-tree verification is not available"):
        target(torch.zeros(1, 2, dtype=torch.long), tree=nl.TreeSpec.chain(2))
    sliding = make_hf("qwen2", tied=True, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    with pytest.raises(nl.GenerationError, match="sliding-window"):
        nl.generate(sliding, [1, 2, 3], max_new_tokens=2, strategy="lookup")
