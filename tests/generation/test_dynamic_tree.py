"""EAGLE-2 dynamic draft trees (strategy "tree"): the selection against a brute-force
reference on a tiny vocabulary, closure under ancestors with ties, lossless greedy and sampled
decoding on attention and recurrent hybrids, and total_tokens="auto"."""

import itertools
import math

import pytest
import torch

import nimblelm as nl
from nimblelm.generation.sampling import SamplingConfig
from nimblelm.generation.speculative.drafters.dynamic_tree import (DynamicTreeDrafter, Expansion, TargetCost,
                                                                   best_size, calibration_tree, expand_tree,
                                                                   select_nodes, size_grid, subtree)

from ..conftest import build
from ..layers.test_recurrent_base import toy_model  # registers the toy recurrent mixer too
from .test_speculative import SAMPLING_CASES, assert_first_two_tokens_follow_target, assert_round_is_exact, noisy_copy


class _Request:
    """What DynamicTreeDrafter.begin reads from a GenerationRequest."""

    def __init__(self, target, max_new_tokens=16):
        self.target, self.max_new_tokens = target, max_new_tokens


def toy_hybrid(vocab_size=256, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = nl.ModelConfig(num_layers=3, mixer_pattern=["toy_ssm", "attention", "toy_ssm"], hidden_size=32,
                         vocab_size=vocab_size)
    model = nl.LanguageModel(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)
    return model


# -- the selection vs brute force ------------------------------------------------------------------
def reference_eagle2(model, context, depth, top_k, total_tokens):
    """EAGLE-2 written over token paths, every distribution from a fresh full forward pass:
    step 1 expands the root; each later step expands the top_k newest paths by cumulative
    log-prob, each with its top_k most probable next tokens; then the total_tokens best of all
    created paths. Returns {path: score}."""

    def logp(path):
        with torch.no_grad():
            return model(torch.tensor([context + list(path)])).logits[0, -1].double().log_softmax(-1)

    created, frontier, scores = [], [()], {(): 0.0}
    for _ in range(depth):
        layer = []
        for path in frontier:
            dist = logp(path)
            for token in dist.topk(top_k).indices.tolist():
                child = path + (token,)
                scores[child] = scores[path] + float(dist[token])
                layer.append(child)
        created += layer
        frontier = sorted(layer, key=lambda p: -scores[p])[:top_k]
    kept = sorted(created, key=lambda p: -scores[p])[:total_tokens]
    return {p: scores[p] for p in kept}, len(created)


def tree_paths(tree):
    tokens = tree.token_list
    return {tuple(tokens[i] for i in tree.path_to(node)[1:]) for node in range(1, len(tree))}


@pytest.mark.parametrize("make", [lambda: build("attention-tiny", vocab_size=4, seed=5),
                                  lambda: toy_hybrid(vocab_size=4, seed=5)], ids=["attention", "toy-ssm-hybrid"])
def test_selection_equals_brute_force_on_a_tiny_vocabulary(make):
    """V=4, depth 3, top_k 2: every total_tokens from 1 to all 10 created nodes, on two
    successive proposals (the second checks that the draft cache discarded the tree nodes)."""
    model = make()
    context = [1, 3, 0, 2]
    for total in range(1, 12):
        drafter = DynamicTreeDrafter(model, depth=3, top_k=2, total_tokens=total)
        drafter.begin(context, _Request(model))
        for ctx in (context, context + [3, 3, 1]):
            tree = drafter.propose(ctx)
            expected, created = reference_eagle2(model, ctx, 3, 2, total)
            assert created == drafter.num_candidates == 10
            assert tree.token_list[0] == ctx[-1] and tree.child_probs is None
            assert len(tree) == 1 + min(total, created)
            assert tree_paths(tree) == set(expected)
            for node in range(1, len(tree)):  # closure: every prefix of a kept path is kept
                assert all(p in tree.path_to(node) for p in tree.path_to(int(tree.parents[node])))
        assert drafter.cache.length == drafter.seen == len(context) + 3 and drafter.calls == 2 * 3


def _constant_expand(row):
    def expand(tokens, parents, frontier):
        return row.expand(len(frontier), -1)

    return expand


@pytest.mark.parametrize("row", [torch.full((4,), math.log(0.25), dtype=torch.float64),  # all tied
                                 torch.tensor([0.0, -math.inf, -math.inf, -math.inf], dtype=torch.float64),
                                 torch.tensor([0.0, -1e-300, -50.0, -math.inf], dtype=torch.float64)],
                         ids=["uniform", "one-hot", "near-ties"])
def test_ties_never_break_closure_and_the_count_is_exact(row):
    expansion = expand_tree(7, _constant_expand(row), depth=4, top_k=3)
    assert len(expansion) == 1 + 3 + 9 * 3
    for total in range(0, len(expansion) + 2):
        kept = select_nodes(expansion, total)
        assert len(kept) == 1 + min(total, len(expansion) - 1)
        assert all(expansion.parents[n] in kept for n in kept[1:])
        tree = subtree(expansion, kept)  # raises unless closed under ancestors
        assert tree.token_list[0] == 7


def test_frontier_is_the_best_of_the_newest_layer():
    """A hand-made case: the best depth-2 path starts with the root's SECOND child."""
    dists = {(): [0.6, 0.4, 0.0], (0,): [0.4, 0.3, 0.3], (1,): [0.95, 0.05, 0.0]}
    dists.update({(a, b): [1 / 3] * 3 for a in range(3) for b in range(3)})

    def expand(tokens, parents, frontier):
        rows = []
        for node in frontier:
            path = []
            while node > 0:
                path.append(tokens[node])
                node = parents[node]
            rows.append(torch.tensor(dists[tuple(reversed(path))], dtype=torch.float64).log())
        return torch.stack(rows)

    expansion = expand_tree(9, expand, depth=3, top_k=2)
    best = expansion.ranking()[:3].tolist()
    assert [expansion.tokens[n] for n in best] == [0, 1, 0]  # 0.6, 0.4, then path (1, 0) with 0.38
    assert expansion.parents[best[2]] == best[1]
    # layer 3 expands (1, 0) [0.38] and (0, 0) [0.24], not (0, 1) / (0, 2) [0.18]
    layer3_parents = {expansion.parents[n] for n in range(len(expansion)) if n > 6}
    assert {(expansion.tokens[expansion.parents[p]], expansion.tokens[p]) for p in layer3_parents} == {(1, 0), (0, 0)}


# -- greedy: lossless for every drafter quality --------------------------------------------------------
def models_under_test():
    yield "attention-fp64", lambda: build("attention-tiny")
    yield "attention-fp32", lambda: build("attention-tiny", dtype=torch.float32)
    yield "toy-ssm-hybrid-fp64", toy_model
    yield "toy-ssm-hybrid-fp32", lambda: toy_model().float()


@pytest.mark.parametrize("name,make", list(models_under_test()), ids=lambda v: v if isinstance(v, str) else "")
def test_greedy_tree_equals_autoregressive(name, make):
    target = make()
    dtype = target.embed.weight.dtype
    prompt = torch.randint(0, target.config.vocab_size, (7,)).tolist()
    expected = nl.generate(target, prompt, max_new_tokens=20).tokens
    drafters = {"perfect": target, "random": build("attention-tiny", dtype=dtype, seed=99),
                "between": noisy_copy(target, 0.5)}
    for kind, draft in drafters.items():
        res = nl.generate(target, prompt, max_new_tokens=20, strategy="tree",
                          drafter=DynamicTreeDrafter(draft, depth=4, top_k=4, total_tokens=12))
        assert torch.equal(res.tokens, expected), kind
        assert res.stats.draft_calls == 4 * res.stats.rounds
    # top_k = 1 makes the tree the draft's greedy chain: a perfect drafter gives depth + 1 per round
    res = nl.generate(target, prompt, max_new_tokens=20, strategy="tree",
                      drafter=DynamicTreeDrafter(target, depth=4, top_k=1, total_tokens=4))
    assert torch.equal(res.tokens, expected) and res.stats.accepted_per_call == 5.0


def test_default_drafter_stop_tokens_and_budget_inside_a_tree():
    target = build("attention-tiny")
    prompt = [1, 2, 3]
    free = nl.generate(target, prompt, max_new_tokens=20).tokens[0].tolist()
    spec = nl.generate(target, prompt, max_new_tokens=20, strategy="tree", drafter=target)  # depth 5, top_k 8, 32
    assert spec.tokens[0].tolist() == free and spec.stats.accepted_per_call > 1
    stop = free[6]
    ar = nl.generate(target, prompt, max_new_tokens=20, stop_tokens=[stop])
    spec = nl.generate(target, prompt, max_new_tokens=20, stop_tokens=[stop], strategy="tree", drafter=target)
    assert spec.sequences() == ar.sequences()
    for n in (1, 3):
        spec = nl.generate(target, prompt, max_new_tokens=n, strategy="tree", drafter=target)
        assert spec.tokens[0].tolist() == free[:n]


def test_errors_before_any_work():
    target = build("attention-tiny")
    with pytest.raises(nl.GenerationError, match="strategy 'tree' needs drafter="):
        nl.generate(target, [1, 2], strategy="tree")
    with pytest.raises(nl.GenerationError, match="LanguageModel or DynamicTreeDrafter"):
        nl.generate(target, [1, 2], strategy="tree", drafter=object())
    other_vocab = nl.LanguageModel(nl.ModelConfig.from_preset("attention-tiny", vocab_size=300))
    with pytest.raises(nl.GenerationError, match="vocabulary \\(300\\) differs"):
        nl.generate(target, [1, 2], strategy="tree", drafter=other_vocab)
    with pytest.raises(ValueError, match="total_tokens"):
        DynamicTreeDrafter(target, total_tokens="many")
    with pytest.raises(ValueError, match="depth >= 1"):
        DynamicTreeDrafter(target, depth=0)


# -- sampling: exact on one round, chi-square end to end -------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(temperature=0.7, top_k=3), dict(temperature=1.0),
                                    dict(temperature=1.2, top_p=0.8)])
@torch.no_grad()
def test_one_round_is_exact_by_enumeration(kwargs):
    """Every branch of verifying the drafter's real tree, then the target's own p when the
    round emitted one token: the first two tokens' joint equals autoregressive sampling's."""
    vocab, prompt = 5, [1, 2, 3]
    config = SamplingConfig(**kwargs)
    target = build("attention-tiny", vocab_size=vocab, seed=3)
    drafter = DynamicTreeDrafter(build("attention-tiny", vocab_size=vocab, seed=4), depth=3, top_k=2, total_tokens=6)
    drafter.begin(prompt, _Request(target))
    tree = drafter.propose(prompt)
    cache = target.make_cache(1, 20)
    target(torch.tensor([prompt[:-1]]), cache=cache)
    assert_round_is_exact(target, prompt, tree, cache, config)


@pytest.mark.parametrize("kwargs", SAMPLING_CASES)
def test_sampled_tree_matches_target_distribution(kwargs):
    """Chi-square on the first two tokens vs the exact processed target distribution."""
    target = build("attention-tiny", vocab_size=5, seed=3)
    drafter = DynamicTreeDrafter(build("attention-tiny", vocab_size=5, seed=4), depth=2, top_k=2, total_tokens=4)
    assert_first_two_tokens_follow_target(target, [1, 2, 3], 200 if kwargs.get("top_k") else 1500, kwargs,
                                          strategy="tree", drafter=drafter)


# -- total_tokens="auto" ---------------------------------------------------------------------------------
def test_best_size_maximises_expected_tokens_per_second():
    scores = torch.log(torch.tensor([1.0, 0.9, 0.5, 0.8, 0.05, 0.01], dtype=torch.float64))
    expansion = Expansion([0, 1, 2, 3, 4, 5], [-1, 0, 1, 0, 3, 4], scores)
    flat = TargetCost([1, 6], [1.0, 1.0])
    assert best_size(expansion, flat, 0.0) == 5  # verification is free: keep everything
    steep = TargetCost([1, 2, 6], [1.0, 1.0, 100.0])
    assert best_size(expansion, steep, 0.0) == 1  # only the one-draft tree costs as little as a plain step
    for m in range(1, 6):  # brute force over every size
        costs = TargetCost([1, 3, 6], [1.0, 1.3, 3.0])
        ranked = sorted(scores[1:].exp().tolist(), reverse=True)
        rates = [(1 + sum(ranked[:k])) / (costs(k + 1) + 0.2) for k in range(1, 6)]
        assert best_size(expansion, costs, 0.2) == rates.index(max(rates)) + 1
    assert TargetCost([2, 4], [1.0, 2.0])(3) == 1.5 and TargetCost([2, 4], [1.0, 2.0])(6) == 3.0
    assert size_grid(13) == [1, 2, 3, 4, 6, 8, 12, 13]
    spec = calibration_tree(9, 3)
    assert len(spec) == 9 and int(spec.depth.max()) == 3


def test_auto_picks_a_size_and_stays_lossless():
    target = build("attention-tiny", dtype=torch.float32)
    prompt = [4, 5, 6, 7]
    expected = nl.generate(target, prompt, max_new_tokens=16).tokens
    drafter = DynamicTreeDrafter(noisy_copy(target, 0.3), depth=3, top_k=4, total_tokens="auto", calibration_repeats=1)
    res = nl.generate(target, prompt, max_new_tokens=16, strategy="tree", drafter=drafter)
    assert torch.equal(res.tokens, expected)
    cost = drafter.target_cost
    assert cost.sizes[-1] == drafter.num_candidates + 1 == 1 + 4 + 16 + 16 and all(s > 0 for s in cost.seconds)
    assert drafter.chosen_sizes and all(1 <= m <= drafter.num_candidates for m in drafter.chosen_sizes)
    calibrated = drafter.target_cost
    nl.generate(target, prompt, max_new_tokens=4, strategy="tree", drafter=drafter)
    assert drafter.target_cost is calibrated  # measured once per target


def test_sizes_enumerated_match_num_candidates():
    model = build("attention-tiny", vocab_size=4)
    for depth, top_k in itertools.product((1, 2, 3), (1, 2, 3, 5)):
        drafter = DynamicTreeDrafter(model, depth=depth, top_k=top_k, total_tokens=1000)
        drafter.begin([1, 2], _Request(model))
        tree = drafter.propose([1, 2])
        assert len(tree) == drafter.max_tree_size == drafter.num_candidates + 1
        assert int(tree.depth.max()) == depth
