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


def check_greedy(target, strategies=HEADS, noise=0.05, n=16, prompt_len=7, **drafter_kwargs):
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
    check_greedy(build(preset), strategies=["hydra", "eagle2"], n=10)


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
