"""Medusa, Hydra and EAGLE draft heads: lossless greedy decoding on attention and recurrent /
hybrid targets, the engine's feature hook, tree shapes, EAGLE's cached drafting against a
from-scratch oracle, sampled exactness, checkpoints and errors."""

import pytest
import torch

import nimblelm as nl
from nimblelm.generation.speculative.drafters import (Eagle2Drafter, EagleDrafter, EagleHead, HydraDrafter,
                                                      HydraHeads, MedusaDrafter, MedusaHeads)
from nimblelm.generation.speculative.drafters.heads import expand_static, rank_tree, shape_parents, target_embed

from ..conftest import build

HEADS = {"medusa": MedusaHeads, "hydra": HydraHeads, "eagle": EagleHead, "eagle2": EagleHead}


def make_heads(strategy: str, target, noise: float = 0.0, seed: int = 0, dtype=None):
    """Heads for ``target``; ``noise`` > 0 perturbs every weight (untrained but not the identity)."""
    torch.manual_seed(seed)
    cfg = target.config
    heads = HEADS[strategy](cfg.hidden_size, cfg.vocab_size)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(noise * torch.randn_like(p))
    return heads.to(dtype or target.embed.weight.dtype)


def check_greedy(target, strategies=HEADS, noise=0.05, n=12, prompt_len=7):
    prompt = torch.randint(0, target.config.vocab_size, (prompt_len,)).tolist()
    expected = nl.generate(target, prompt, max_new_tokens=n).tokens
    for strategy in strategies:
        res = nl.generate(target, prompt, max_new_tokens=n, strategy=strategy,
                          drafter=make_heads(strategy, target, noise))
        assert torch.equal(res.tokens, expected), strategy
        assert res.stats.new_tokens == n


@pytest.mark.parametrize("preset", ["attention-tiny", "mamba2-tiny"])
def test_greedy_equals_autoregressive_fp64(preset):
    check_greedy(build(preset))


@pytest.mark.parametrize("preset", ["griffin-tiny", "jamba-tiny"])
def test_greedy_equals_autoregressive_hybrids(preset):
    check_greedy(build(preset), strategies=["hydra", "eagle2"], n=8)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["attention-tiny", "mamba2-tiny", "griffin-tiny", "jamba-tiny"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_greedy_equals_autoregressive_all(preset, dtype):
    target = build(preset, dtype=dtype)
    for noise in (0.0, 0.05, 0.5):
        check_greedy(target, noise=noise, n=24)


def test_greedy_fp32_attention_and_one_token_prompt():
    target = build("attention-tiny", dtype=torch.float32)
    check_greedy(target, strategies=["medusa", "eagle"], noise=0.1)
    check_greedy(target, strategies=["hydra", "eagle2"], prompt_len=1, n=8)


def test_engine_gives_features_of_committed_tokens():
    """observe_features sees, in order, exactly the target's hidden states of every committed
    token (a fresh full forward over prompt + emitted tokens, minus the last one)."""
    target = build("mamba2-tiny")
    prompt = [3, 1, 4, 1, 5]
    seen = []

    class Recording(MedusaDrafter):
        def observe_features(self, hidden):
            seen.append(hidden.clone())
            super().observe_features(hidden)

    res = nl.generate(target, prompt, max_new_tokens=12, strategy="medusa",
                      drafter=Recording(make_heads("medusa", target, 0.05)))
    tokens = prompt + res.tokens[0].tolist()
    full = target(torch.tensor([tokens[:-1]])).hidden[0]
    got = torch.cat(seen)
    assert got.shape == full.shape
    torch.testing.assert_close(got, full, rtol=1e-9, atol=1e-9)


def briefly_trained(strategy: str, target, steps: int = 8):
    """Heads after a few steps of self-distillation on random text (the training objective)."""
    from nimblelm.training.train_drafter import DrafterObjective

    kind = "eagle" if strategy == "eagle2" else strategy
    heads = make_heads(strategy, target, 0.0)
    objective = DrafterObjective(kind, heads, target)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):  # sign descent (Adam's first step); torch.optim's first step imports for seconds
        loss, _ = objective(torch.randint(0, target.config.vocab_size, (2, 17), generator=gen))
        heads.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in heads.parameters():
                p -= 3e-3 * p.grad.sign()
    return heads.eval()


@pytest.mark.parametrize("preset", ["attention-tiny"] + [pytest.param(name, marks=pytest.mark.slow)
                                                         for name in ("mamba2-tiny", "griffin-tiny", "jamba-tiny")])
def test_greedy_with_briefly_trained_heads(preset):
    target = build(preset, dtype=torch.float32)
    prompt = torch.randint(0, target.config.vocab_size, (6,)).tolist()
    expected = nl.generate(target, prompt, max_new_tokens=12).tokens
    for strategy in HEADS:
        heads = briefly_trained(strategy, target)
        assert not all(torch.equal(a, b) for a, b in zip(heads.state_dict().values(),
                                                          make_heads(strategy, target).state_dict().values()))
        res = nl.generate(target, prompt, max_new_tokens=12, strategy=strategy, drafter=heads)
        assert torch.equal(res.tokens, expected), strategy


# -- tree shapes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,depth,top_k", [(20, 4, 4), (10, 5, 3), (1, 3, 2), (30, 2, 8)])
def test_rank_tree_shapes_are_valid(size, depth, top_k):
    shape = rank_tree(size, depth, top_k)
    assert len(shape) == min(size, sum(top_k ** d for d in range(1, depth + 1)))
    assert len(set(shape)) == len(shape)
    assert all(1 <= len(p) <= depth and max(p) < top_k for p in shape)
    parents = shape_parents(shape)  # raises unless every parent comes first
    assert all(parents[i] < i for i in range(1, len(parents)))
    assert shape[0] == (0,)
    # more branching near the root: the root has at least as many children as any other node
    children = [parents.count(i) for i in range(len(parents))]
    assert children[0] == max(children)


def test_expand_static_takes_the_ranked_tokens():
    torch.manual_seed(0)
    vocab = 6
    table = {}

    def expand(tokens, parents, frontier):
        rows = []
        for node in frontier:
            key = tuple(tokens[:node + 1]), node
            table.setdefault(key, torch.randn(vocab).log_softmax(-1))
            rows.append(table[key])
        return torch.stack(rows)

    shape = rank_tree(12, 3, 3)
    tree = expand_static(9, shape, expand)
    assert len(tree) == len(shape) + 1 and tree.token_list[0] == 9
    for i, path in enumerate(shape, start=1):
        parent = tree.parents[i].item()
        logp = table[tuple(tree.token_list[:parent + 1]), parent]
        assert tree.token_list[i] == logp.argsort(descending=True)[path[-1]].item()
    # ranks beyond the vocabulary are dropped with their subtrees
    wide = rank_tree(12, 3, 4)
    small = expand_static(0, wide, lambda t, p, f: torch.zeros(len(f), 2))
    assert len(small) == 1 + sum(1 for path in wide if max(path) < 2) < 1 + len(wide)


def test_eagle2_tree_sizes_and_auto():
    target = build("attention-tiny")
    prompt = [1, 2, 3, 4, 5]
    for total in (1, 5, 12):
        drafter = Eagle2Drafter(make_heads("eagle2", target, 0.1), depth=3, top_k=3, total_tokens=total)
        nl.generate(target, prompt, max_new_tokens=6, strategy="eagle2", drafter=drafter)
        assert set(drafter.chosen_sizes) == {total}
    drafter = Eagle2Drafter(make_heads("eagle2", target, 0.1), depth=3, top_k=3, total_tokens="auto",
                            calibration_repeats=1)
    expected = nl.generate(target, prompt, max_new_tokens=8).tokens
    res = nl.generate(target, prompt, max_new_tokens=8, strategy="eagle2", drafter=drafter)
    assert torch.equal(res.tokens, expected)
    assert drafter.chosen_sizes and all(1 <= s <= drafter.num_candidates for s in drafter.chosen_sizes)


# -- EAGLE drafting vs a from-scratch oracle ----------------------------------------------------------
def test_eagle_cached_drafting_equals_full_recompute():
    """Every drafted node's children equal the top-k of the head run WITHOUT a cache over the
    whole sequence: entries [e(x_{j+1}); f_j] of the committed context, then the node's path
    with each token paired with the previous predicted feature."""
    target = build("attention-tiny")
    head = make_heads("eagle", target, 0.3)
    trees = []

    class Recording(EagleDrafter):
        def propose(self, context):
            tree = super().propose(context)
            trees.append((list(context), tree))
            return tree

    drafter = Recording(head, tree_size=10, max_depth=3, top_k=3)
    nl.generate(target, [7, 3, 9, 2], max_new_tokens=10, strategy="eagle", drafter=drafter)
    assert len(trees) >= 2
    for context, tree in trees:
        feats = target(torch.tensor([context[:-1]])).hidden[0]  # f_0 .. f_{c-1}
        for node in range(len(tree)):
            kids = [tree.token_list[k] for k in tree.children[node]]
            if not kids:
                continue
            tokens, inputs = context[1:], feats  # entry j = [e(x_{j+1}); f_j]
            out = head(target_embed(target, torch.tensor(tokens))[None], inputs[None])[0]
            for i in tree.path_to(node)[1:]:  # a draft token is paired with the previous prediction
                tokens, inputs = tokens + [tree.token_list[i]], torch.cat([inputs, out[-1:]])
                out = head(target_embed(target, torch.tensor(tokens))[None], inputs[None])[0]
            ranked = target._head_logits(out[-1:][None])[0, 0].argsort(descending=True).tolist()
            assert kids == ranked[:len(kids)], (node, kids, ranked[:4])
    # the head's own cache after the last round == a fresh prefill of the committed entries
    context = trees[-1][0]
    committed = len(context) - 1
    assert drafter.cache.length == committed and drafter.cache.pending == 0
    fresh = head.make_cache(committed)
    head(target_embed(target, torch.tensor(context[1:]))[None], target(torch.tensor([context[:-1]])).hidden,
         cache=fresh)
    got, want = drafter.cache.states[0], fresh.states[0]
    torch.testing.assert_close(got.k[:, :, :committed], want.k, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.v[:, :, :committed], want.v, rtol=1e-10, atol=1e-10)


# -- sampled decoding -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["medusa", "hydra", "eagle", "eagle2"])
def test_sampled_first_two_tokens_match_target(strategy):
    """Chi-square on the joint of the first two tokens vs the exact processed target
    distribution (deterministic top-k drafts, verified as one-hot proposals)."""
    from .test_speculative import assert_first_two_tokens_follow_target

    target = build("attention-tiny", vocab_size=5, seed=3)
    assert_first_two_tokens_follow_target(target, [1, 2, 3], 500, dict(temperature=0.9, top_k=4),
                                          strategy=strategy, drafter=make_heads(strategy, target, 0.3))


# -- checkpoints and errors ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["medusa", "hydra", "eagle"])
def test_save_load_round_trip(tmp_path, kind):
    from nimblelm.drafter_io import save_drafter

    target = build("attention-tiny", dtype=torch.float32)
    heads = make_heads(kind, target, 0.2, dtype=torch.float32)
    save_drafter(heads, str(tmp_path / "exact"))
    loaded = nl.load_drafter(str(tmp_path / "exact"), kind)
    assert type(loaded) is type(heads)
    for (name, a), (_, b) in zip(heads.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    # stored as bf16, loaded as fp32, found under a model directory's drafters/<kind>/
    target.save(str(tmp_path / "model"))
    save_drafter(heads, str(tmp_path / "model" / "drafters" / kind), weight_dtype=torch.bfloat16)
    compact = nl.load_drafter(str(tmp_path / "model"), kind)
    assert all(p.dtype == torch.float32 for p in compact.parameters())
    for (name, a), (_, b) in zip(heads.state_dict().items(), compact.state_dict().items()):
        assert torch.equal(a.bfloat16().float(), b), name
    strategy = "eagle2" if kind == "eagle" else kind
    prompt = [4, 8, 15, 16, 23]
    ar = nl.generate(target, prompt, max_new_tokens=10).tokens
    first = nl.generate(target, prompt, max_new_tokens=10, strategy=strategy, drafter=heads)
    again = nl.generate(target, prompt, max_new_tokens=10, strategy=strategy, drafter=loaded)
    assert torch.equal(first.tokens, ar) and torch.equal(again.tokens, ar)
    assert first.stats.rounds == again.stats.rounds


def test_sps_drafter_loads_as_draft_model(tmp_path):
    from nimblelm.generation.speculative.drafters import DraftModelDrafter

    target = build("attention-tiny", dtype=torch.float32)
    draft = build("attention-tiny", dtype=torch.float32, seed=5, num_layers=1)
    draft.save(str(tmp_path / "model" / "drafters" / "sps"))
    drafter = nl.load_drafter(str(tmp_path / "model"), "sps")
    assert isinstance(drafter, DraftModelDrafter) and drafter.model.config.num_layers == 1
    res = nl.generate(target, [1, 2, 3], max_new_tokens=8, strategy="sps", drafter=drafter)
    assert torch.equal(res.tokens, nl.generate(target, [1, 2, 3], max_new_tokens=8).tokens)


def test_checkpoint_and_mismatch_errors(tmp_path):
    from nimblelm.drafter_io import save_drafter

    target = build("attention-tiny")
    save_drafter(MedusaHeads(64, 256), str(tmp_path / "m"))
    with pytest.raises(nl.CheckpointError, match="holds a 'medusa' drafter, not 'hydra'"):
        nl.load_drafter(str(tmp_path / "m"), "hydra")
    with pytest.raises(nl.CheckpointError, match="unknown drafter kind 'tree'"):
        nl.load_drafter(str(tmp_path / "m"), "tree")
    with pytest.raises(nl.CheckpointError, match="no eagle drafter at"):
        nl.load_drafter(str(tmp_path), "eagle")
    with pytest.raises(nl.CheckpointError, match="draft heads, not a draft LM"):
        nl.load_drafter(str(tmp_path / "m"), "sps")
    (tmp_path / "m" / "drafter.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(nl.CheckpointError, match="not a readable safetensors file"):
        nl.load_drafter(str(tmp_path / "m"), "medusa")
    wrong_hidden = build("attention-tiny", hidden_size=32, num_heads=2)
    with pytest.raises(nl.GenerationError, match="hidden_size=64, vocab_size=256 but the target has hidden_size=32"):
        nl.generate(wrong_hidden, [1, 2], strategy="medusa", drafter=MedusaHeads(64, 256))
    with pytest.raises(nl.GenerationError, match="vocabulary \\(300\\) differs from the target's \\(256\\)"):
        nl.generate(target, [1, 2], strategy="eagle", drafter=EagleHead(64, 300))
    with pytest.raises(nl.GenerationError, match="strategy 'eagle' needs drafter=<EagleHead>.*got MedusaHeads"):
        nl.generate(target, [1, 2], strategy="eagle", drafter=MedusaHeads(64, 256))
    with pytest.raises(nl.GenerationError, match="strategy 'eagle' needs drafter=<EagleHead>.*got Eagle2Drafter"):
        nl.generate(target, [1, 2], strategy="eagle", drafter=Eagle2Drafter(EagleHead(64, 256)))
    with pytest.raises(nl.GenerationError, match="max_depth must be in 1..2"):
        HydraDrafter(HydraHeads(64, 256, num_heads=2), max_depth=3)
    with pytest.raises(nl.GenerationError, match="total_tokens must be a positive integer or 'auto'"):
        Eagle2Drafter(EagleHead(64, 256), total_tokens=0)
