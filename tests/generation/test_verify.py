"""Lossless verification of draft trees.

Exactness by enumeration: on tiny vocabularies, every random branch of one round (draft
samples AND acceptance coins / residual draws, via ``exact_outcomes``) is enumerated with its
exact probability, and the distribution of the first emitted tokens must equal the target's
autoregressive distribution to 1e-12 (float64). A round that emits fewer tokens than the
prefix being checked continues with the target's own p, which the first-token check shows
the next round reproduces. Then Monte Carlo chi-square tests with the real torch.Generator,
and negative controls (always-accept, Medusa typical acceptance, the i.i.d. rule applied to
siblings drawn without replacement) that the very same checks must reject.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable

import pytest
import torch

from nimblelm.errors import GenerationError
from nimblelm.generation.sampling import SamplingConfig, probabilities
from nimblelm.generation.speculative.tree import DraftTree
from nimblelm.generation.speculative.verify import (TorchRandomness, VerifyResult, exact_outcomes, truncate_at_stop,
                                                    verify, verify_chain, verify_greedy, verify_greedy_on_demand,
                                                    verify_tree_deterministic,
                                                    verify_tree_sampled)


# -- a tiny "language model": a fixed random table of distributions per context ---------------
class Oracle:
    """p(context) for ANY context tuple: random logits seeded by (seed, context), processed by
    ``sampling.probabilities`` (temperature, top-k, top-p) exactly as autoregressive sampling does."""

    def __init__(self, vocab: int, seed: int, config: SamplingConfig = SamplingConfig(1.0), scale: float = 1.5):
        self.vocab, self.seed, self.config, self.scale = vocab, seed, config, scale
        self.table: dict[tuple, torch.Tensor] = {}

    def __call__(self, context: tuple) -> torch.Tensor:
        if context not in self.table:
            gen = torch.Generator().manual_seed(hash((self.seed,) + context) % 2**61)
            logits = torch.randn(self.vocab, generator=gen, dtype=torch.float64) * self.scale
            self.table[context] = probabilities(logits, self.config)
        return self.table[context]


CHAIN2, CHAIN3 = [-1, 0, 1], [-1, 0, 1, 2]
TREE_A = [-1, 0, 0, 1, 1, 2, 2]  # root with 2 children, each with 2
TREE_B = [-1, 0, 0, 1, 1]  # root with 2 children, the first with 2
TREE_C = [-1, 0, 0, 0, 1]  # root with 3 children, the first with 1
TREE_D = [-1, 0, 0, 0, 1, 1, 2, 4, 4]  # deeper deterministic tree


def node_contexts(context: tuple, tokens: list[int], parents: list[int]) -> list[tuple]:
    contexts = [context]
    for i in range(1, len(tokens)):
        contexts.append(contexts[parents[i]] + (tokens[i],))
    return contexts


def sampled_tree(rng, context, draft: Oracle, template, target: Oracle, without_replacement: bool):
    """Draft children of every node from q(node's context): siblings without replacement or i.i.d."""
    tokens, contexts, drawn = [context[-1]], [context], defaultdict(list)
    for i in range(1, len(template)):
        parent = template[i]
        q = draft(contexts[parent]).clone()
        for token in drawn[parent] if without_replacement else []:
            q[token] = 0.0
        token = rng.categorical(q)
        drawn[parent].append(token)
        tokens.append(token)
        contexts.append(contexts[parent] + (token,))
    return _tree(tokens, template, contexts, draft, target, without_replacement)


def topk_tree(context, draft: Oracle, template, target: Oracle):
    """Deterministic drafts: the children of a node are the top-k tokens of q (EAGLE-2 style)."""
    tokens, contexts, taken = [context[-1]], [context], defaultdict(int)
    order = {}
    for i in range(1, len(template)):
        parent = template[i]
        if parent not in order:
            order[parent] = draft(contexts[parent]).argsort(descending=True, stable=True).tolist()
        token = order[parent][taken[parent]]
        taken[parent] += 1
        tokens.append(token)
        contexts.append(contexts[parent] + (token,))
    tree, probs = _tree(tokens, template, contexts, draft, target, False)
    return DraftTree(tree.tokens, tree.parents), probs


def _tree(tokens, template, contexts, draft, target, without_replacement):
    child_probs = torch.stack([draft(c) for c in contexts])
    tree = DraftTree(tokens, template, child_probs, children_sampled_without_replacement=without_replacement)
    return tree, torch.stack([target(c) for c in contexts])


# -- the negative controls: same signature as the real verifiers ------------------------------
def always_accept(tree: DraftTree, target_probs, rng) -> VerifyResult:
    node, path = 0, [0]
    while tree.children[node]:
        node = tree.children[node][0]
        path.append(node)
    return VerifyResult(path, [tree.token_list[i] for i in path[1:]], rng.categorical(target_probs[node]))


def typical_acceptance(tree: DraftTree, target_probs, rng, eps: float = 0.09, delta: float = 0.3) -> VerifyResult:
    """Medusa: accept a candidate x when p(x) > min(eps, delta * exp(-H(p)))."""
    node, path = 0, [0]
    while True:
        p = target_probs[node]
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        threshold = min(eps, delta * math.exp(-float(entropy)))
        match = next((c for c in tree.children[node] if float(p[tree.token_list[c]]) > threshold), None)
        if match is None:
            return VerifyResult(path, [tree.token_list[i] for i in path[1:]], rng.categorical(p))
        node = match
        path.append(node)


def iid_rule_on_wor_drafts(tree: DraftTree, target_probs, rng) -> VerifyResult:
    """Siblings drawn without replacement but verified as if drawn independently."""
    wrong = DraftTree(tree.tokens, tree.parents, tree.child_probs, children_sampled_without_replacement=False)
    return verify_tree_sampled(wrong, target_probs, rng)


# -- one round, and the exact distribution of what it emits -----------------------------------
VERIFIERS = {"chain": verify_chain, "deterministic": verify_tree_deterministic, "wor": verify_tree_sampled,
             "iid": verify_tree_sampled}


def make_round(mode: str, template, target: Oracle, draft: Oracle, context: tuple,
               verifier: Callable | None = None) -> Callable:
    """A function rng -> emitted tokens of one drafting + verification round (for sampling)."""
    check = verifier or VERIFIERS[mode]

    def run(rng) -> tuple[int, ...]:
        if mode == "deterministic":
            tree, probs = topk_tree(context, draft, template, target)
        else:
            tree, probs = sampled_tree(rng, context, draft, template, target, without_replacement=mode == "wor")
        return tuple(check(tree, probs, rng).tokens)

    return run


def draft_outcomes(mode: str, template, target: Oracle, draft: Oracle, context: tuple):
    """Every draft tree of a round with its exact probability (a single one for top-k drafts)."""
    if mode == "deterministic":
        yield (1.0, *topk_tree(context, draft, template, target))
        return

    def extend(prob, tokens, contexts, drawn):
        if len(tokens) == len(template):
            yield (prob, *_tree(tokens, template, contexts, draft, target, mode == "wor"))
            return
        parent = template[len(tokens)]
        q = draft(contexts[parent]).tolist()
        for token in drawn.get(parent, []) if mode == "wor" else []:
            q[token] = 0.0
        total = sum(q)
        for token, weight in enumerate(q):
            if weight > 0:
                yield from extend(prob * weight / total, tokens + [token], contexts + [contexts[parent] + (token,)],
                                  {**drawn, parent: drawn.get(parent, []) + [token]})

    yield from extend(1.0, [context[-1]], [context], {})


def round_outcomes(mode: str, template, target: Oracle, draft: Oracle, context: tuple,
                   verifier: Callable | None = None) -> list[tuple[float, tuple]]:
    """Exact distribution of one round's emitted tokens: draft trees enumerated here, coins and
    residual draws of the verification by ``exact_outcomes``."""
    check = verifier or VERIFIERS[mode]
    outcomes = []
    for prob, tree, probs in draft_outcomes(mode, template, target, draft, context):
        for branch, result in exact_outcomes(lambda rng: check(tree, probs, rng)):
            outcomes.append((prob * branch, tuple(result.tokens)))
    return outcomes


def prefix_distribution(outcomes, context: tuple, target: Oracle, length: int) -> dict[tuple, float]:
    """Exact distribution of the first ``length`` emitted tokens; a short emission is continued
    autoregressively with the target's p."""
    dist: dict[tuple, float] = defaultdict(float)

    def extend(prob: float, seq: tuple) -> None:
        if len(seq) >= length:
            dist[seq[:length]] += prob
            return
        for token, p in enumerate(target(context + seq).tolist()):
            if p > 0:
                extend(prob * p, seq + (token,))

    for prob, seq in outcomes:
        extend(prob, tuple(seq))
    return dist


def max_error(outcomes, context, target, length) -> float:
    got = prefix_distribution(outcomes, context, target, length)
    want = prefix_distribution([(1.0, ())], context, target, length)
    return max(abs(got.get(k, 0.0) - want.get(k, 0.0)) for k in set(got) | set(want))


def case(vocab, target_cfg, draft_cfg, seed=0, same=False):
    target = Oracle(vocab, seed, target_cfg)
    draft = target if same else Oracle(vocab, seed + 100, draft_cfg, scale=1.0)
    return target, draft


PLAIN, DRAFTY = SamplingConfig(1.0), SamplingConfig(1.3)
TOPK, TOPP = SamplingConfig(0.8, top_k=2), SamplingConfig(1.2, top_p=0.7)
DRAFT_TOPK = SamplingConfig(1.0, top_k=3)  # q = 0 on most tokens

CHAIN_TREE = [-1, 0, 0, 1]  # root with 2 children, the first with 1
EXACT_CASES = [
    # mode, vocab, template, target config, draft config, p == q, prefix lengths checked
    ("chain", 3, CHAIN3, PLAIN, DRAFTY, False, (1, 2, 3, 4)),
    ("chain", 5, CHAIN2, TOPK, DRAFTY, False, (1, 2, 3)),
    ("chain", 5, CHAIN2, TOPP, DRAFTY, True, (1, 2, 3)),
    ("chain", 8, CHAIN2, TOPP, DRAFT_TOPK, False, (1, 2)),
    ("deterministic", 3, TREE_A, PLAIN, DRAFTY, False, (1, 2, 3)),
    ("deterministic", 5, TREE_D, TOPK, DRAFTY, False, (1, 2, 3)),
    ("deterministic", 8, TREE_D, TOPP, DRAFTY, True, (1, 2, 3)),
    ("deterministic", 8, TREE_D, PLAIN, DRAFT_TOPK, False, (1, 2)),
    ("wor", 3, TREE_A, PLAIN, DRAFTY, False, (1, 2, 3)),
    ("wor", 3, TREE_A, TOPK, DRAFTY, True, (1, 2, 3)),
    ("wor", 5, CHAIN_TREE, TOPP, DRAFTY, False, (1, 2, 3)),
    ("wor", 8, TREE_C, PLAIN, DRAFT_TOPK, False, (1, 2)),
    ("iid", 3, TREE_B, TOPP, DRAFTY, False, (1, 2, 3)),
    ("iid", 5, [-1, 0, 0], PLAIN, DRAFTY, True, (1, 2)),
]


@pytest.mark.parametrize("mode, vocab, template, target_cfg, draft_cfg, same, lengths", EXACT_CASES)
def test_exact_distribution_by_enumeration(mode, vocab, template, target_cfg, draft_cfg, same, lengths):
    target, draft = case(vocab, target_cfg, draft_cfg, seed=vocab, same=same)
    contexts = [(0,)] if len(template) > 5 and mode != "deterministic" else [(0,), (vocab - 1, 1)]
    errors = []
    for context in contexts:
        outcomes = round_outcomes(mode, template, target, draft, context)
        assert abs(sum(p for p, _ in outcomes) - 1.0) < 1e-12
        for _, seq in outcomes:  # filtered tokens are never emitted
            assert all(float(target(context + seq[:i])[t]) > 0 for i, t in enumerate(seq))
        errors += [max_error(outcomes, context, target, length) for length in lengths]
    assert max(errors) < 1e-12, errors


def test_enumeration_reaches_every_branch():
    """Sanity of the harness itself: rejections and long acceptances both occur."""
    target, draft = case(3, PLAIN, DRAFTY, seed=3)
    outcomes = round_outcomes("wor", TREE_B, target, draft, (0,))
    lengths = {len(seq) for _, seq in outcomes}
    assert lengths == {1, 2, 3}


@pytest.mark.parametrize("control, mode, vocab, template", [
    (always_accept, "chain", 5, CHAIN2),
    (always_accept, "wor", 5, CHAIN_TREE),
    (typical_acceptance, "deterministic", 5, TREE_D),
    (typical_acceptance, "wor", 5, CHAIN_TREE),
    (iid_rule_on_wor_drafts, "wor", 4, TREE_C),
])
def test_exact_check_detects_lossy_verification(control, mode, vocab, template):
    target, draft = case(vocab, PLAIN, DRAFTY, seed=vocab)
    outcomes = round_outcomes(mode, template, target, draft, (0,), verifier=control)
    assert max_error(outcomes, (0,), target, 2) > 1e-3


# -- Monte Carlo chi-square ----------------------------------------------------------------------
def chi_square_p_value(counts: dict, expected_probs: dict, total: int) -> float:
    """Goodness of fit; cells expected below 5 are pooled. Survival of chi2 via the regularised
    upper incomplete gamma."""
    cells = sorted(set(expected_probs) | set(counts))
    pooled_obs = pooled_exp = 0.0
    stat, df = 0.0, -1
    for cell in cells:
        exp, obs = expected_probs.get(cell, 0.0) * total, counts.get(cell, 0)
        if exp < 5:
            pooled_obs, pooled_exp = pooled_obs + obs, pooled_exp + exp
            continue
        stat += (obs - exp) ** 2 / exp
        df += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        df += 1
    elif pooled_obs > 0:  # tokens the target can never emit
        return 0.0
    args = torch.tensor([df / 2, stat / 2], dtype=torch.float64)
    return float(torch.special.gammaincc(args[0], args[1]))


def sample_prefixes(run: Callable, context, target: Oracle, length: int, rounds: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    rng = TorchRandomness(gen)
    counts: dict[tuple, int] = defaultdict(int)
    for _ in range(rounds):
        seq = run(rng)
        while len(seq) < length:  # the next round would continue from p: sample it
            seq = seq + (int(torch.multinomial(target(context + seq), 1, generator=gen)),)
        counts[seq[:length]] += 1
    return counts


MC_CASES = [
    ("chain", 3, CHAIN3, TOPP, 3),
    ("deterministic", 4, TREE_D, TOPK, 2),
    ("wor", 4, TREE_B, PLAIN, 2),
    ("iid", 4, TREE_B, PLAIN, 2),
]


@pytest.mark.parametrize("mode, vocab, template, target_cfg, length", MC_CASES)
def test_chi_square_matches_autoregressive(mode, vocab, template, target_cfg, length):
    target, draft = case(vocab, target_cfg, DRAFTY, seed=11)
    context, rounds = (1,), 1000
    counts = sample_prefixes(make_round(mode, template, target, draft, context), context, target, length,
                             rounds, seed=5)
    expected = prefix_distribution([(1.0, ())], context, target, length)
    assert chi_square_p_value(counts, expected, rounds) > 1e-4


@pytest.mark.parametrize("control, mode, template", [
    (always_accept, "chain", CHAIN3),
    (typical_acceptance, "deterministic", TREE_D),
])
def test_chi_square_detects_lossy_verification(control, mode, template):
    target, draft = case(4, PLAIN, DRAFTY, seed=11)
    context, rounds = (1,), 600
    run = make_round(mode, template, target, draft, context, verifier=control)
    counts = sample_prefixes(run, context, target, 2, rounds, seed=5)
    expected = prefix_distribution([(1.0, ())], context, target, 2)
    assert chi_square_p_value(counts, expected, rounds) < 1e-6


def test_chi_square_p_value_sanity():
    expected = {(0,): 0.5, (1,): 0.5}
    assert chi_square_p_value({(0,): 50, (1,): 50}, expected, 100) == pytest.approx(1.0)
    # stat = 4 with one degree of freedom: p = 0.0455
    assert chi_square_p_value({(0,): 60, (1,): 40}, expected, 100) == pytest.approx(0.0455, abs=1e-4)


# -- greedy ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_greedy_equals_argmax_decoding(seed):
    vocab, context = 3, (seed, seed % 3)
    target = Oracle(vocab, seed, SamplingConfig(0.0))
    gen = torch.Generator().manual_seed(seed)
    tokens = [context[-1]] + torch.randint(0, vocab, (len(TREE_D) - 1,), generator=gen).tolist()
    contexts = node_contexts(context, tokens, TREE_D)
    tree, probs = DraftTree(tokens, TREE_D), torch.stack([target(c) for c in contexts])
    result = verify_greedy(tree, probs)
    reference, seq = [], context
    for _ in range(len(result.tokens)):
        reference.append(int(target(seq).argmax()))
        seq = seq + (reference[-1],)
    assert result.tokens == reference
    assert [tree.token_list[i] for i in result.path[1:]] == result.accepted
    assert all(tree.parents[b] == a for a, b in zip(result.path, result.path[1:]))
    assert len(result.accepted) == max(  # the longest matching path
        sum(1 for _ in _matching_prefix(tree, path, probs)) for path in tree.paths)
    # the sampling verifiers, fed one-hot p, are deterministic and agree with greedy
    for verifier in (verify_tree_deterministic, lambda t, p, r: verify(t, p, r)):
        outcomes = exact_outcomes(lambda rng: verifier(tree, probs, rng))
        assert [(p, r.tokens) for p, r in outcomes] == [(1.0, result.tokens)]
    assert verify(tree, probs, greedy=True) == result


@pytest.mark.parametrize("seed", range(6))
def test_greedy_on_demand_equals_greedy_and_scores_each_node_once(seed):
    gen = torch.Generator().manual_seed(seed)
    vocab, n = 3, 24  # a small vocabulary: long accepted paths, often off the first children
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]
    tree = DraftTree(torch.randint(0, vocab, (n,), generator=gen), parents)
    logits = torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    calls = []

    def argmax_of(nodes):
        calls.append(list(nodes))
        return logits[nodes].argmax(-1).tolist()

    result = verify_greedy_on_demand(tree, argmax_of, vocab)
    assert result == verify_greedy(tree, logits)
    scored = [node for call in calls for node in call]
    assert len(scored) == len(set(scored)) and set(result.path) <= set(scored)
    for call in calls:  # each call: a node and its first-child descendants
        assert all(tree.children[a][0] == b for a, b in zip(call, call[1:])) and not tree.children[call[-1]]


def test_greedy_on_demand_one_call_on_the_first_children():
    tree = DraftTree([5, 1, 2, 3, 4], [-1, 0, 0, 1, 1])  # root -> (1 -> (3, 4), 2)
    best = {0: 1, 1: 3, 3: 0}  # the walk: 0 -> 1 -> 3, then 0 at the leaf
    calls = []
    result = verify_greedy_on_demand(tree, lambda nodes: calls.append(nodes) or [best.get(i, 0) for i in nodes], 8)
    assert result.path == [0, 1, 3] and result.next_token == 0 and calls == [[0, 1, 3]]
    with pytest.raises(GenerationError, match="out of range"):
        verify_greedy_on_demand(tree, lambda nodes: [0] * len(nodes), 4)


def _matching_prefix(tree, path, probs):
    for a, b in zip(path, path[1:]):
        if tree.token_list[b] != int(probs[a].argmax()):
            return
        yield b


# -- accounting ------------------------------------------------------------------------------------
@pytest.mark.parametrize("accept_rate", [0.3, 0.8])
@pytest.mark.parametrize("drafts", [1, 4])
def test_expected_tokens_per_round(accept_rate, drafts):
    """p = (a, 1-a, 0) and q = (a, 0, 1-a) at every node: every draft is accepted with
    probability sum min(p, q) = a, so E[tokens per round] = (1 - a^(k+1)) / (1 - a)."""
    a = accept_rate
    p, q = torch.tensor([a, 1 - a, 0.0], dtype=torch.float64), torch.tensor([a, 0.0, 1 - a], dtype=torch.float64)
    want = (1 - a ** (drafts + 1)) / (1 - a)

    def run(rng):
        tokens = [0]
        for _ in range(drafts):
            tokens.append(rng.categorical(q))
        tree = DraftTree.chain(tokens, child_probs=q.expand(drafts + 1, 3))
        return len(verify_chain(tree, p.expand(drafts + 1, 3), rng).tokens)

    assert sum(prob * n for prob, n in exact_outcomes(run)) == pytest.approx(want, abs=1e-12)
    if drafts == 4 and a == 0.8:  # and by Monte Carlo with the real generator
        rng, rounds = TorchRandomness(torch.Generator().manual_seed(0)), 1000
        lengths = torch.tensor([run(rng) for _ in range(rounds)], dtype=torch.float64)
        assert abs(float(lengths.mean()) - want) < 4 * float(lengths.std()) / math.sqrt(rounds)
    # deterministic (one-hot) chain of token 0: accepted with probability p(0) = a
    tree = DraftTree.chain([0] * (drafts + 1))
    outcomes = exact_outcomes(lambda r: len(verify(tree, p.expand(drafts + 1, 3), r).tokens))
    assert sum(prob * n for prob, n in outcomes) == pytest.approx(want, abs=1e-12)


# -- edge cases ----------------------------------------------------------------------------------
class AlwaysReject:
    """Forces every coin to come up 'reject' (even probability-1 acceptances) and records draws."""

    def __init__(self):
        self.draws = []

    def coin(self, prob):
        return False

    def categorical(self, probs):
        self.draws.append(probs.clone())
        return int(probs.argmax())


def test_zero_residual_mass_falls_back_without_nan():
    p = torch.tensor([0.25, 0.75, 0.0, 0.0], dtype=torch.float64)
    # p == q: max(0, p - q) has no mass; the fallback zeroes the rejected token instead
    tree = DraftTree.chain([0, 1, 0], child_probs=p.expand(3, 4))
    rng = AlwaysReject()
    result = verify_chain(tree, p.expand(3, 4), rng)
    assert result.path == [0] and result.next_token == 0
    residual = rng.draws[-1]
    assert torch.isfinite(residual).all() and residual.tolist() == [1.0, 0.0, 0.0, 0.0]
    # p one-hot at the drafted token: nothing left after zeroing it, fall back to r itself
    one_hot = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    rng = AlwaysReject()
    result = verify_tree_deterministic(DraftTree([0, 1, 2], [-1, 0, 0]), one_hot.expand(3, 4), rng)
    assert result.next_token == 1 and torch.equal(rng.draws[-1], one_hot)
    # with p == q real coins always accept: exact enumeration has a single outcome
    outcomes = exact_outcomes(lambda r: verify_chain(tree, p.expand(3, 4), r).accepted)
    assert {tuple(o) for _, o in outcomes} == {(1, 0)} and sum(pr for pr, _ in outcomes) == 1.0


def test_q_zero_and_p_zero_candidates():
    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    q = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    # a candidate the draft gave q = 0 but the target likes is accepted (no division by zero)
    chain = DraftTree.chain([2, 0], child_probs=q.expand(2, 3))
    outcomes = exact_outcomes(lambda r: verify_chain(chain, p.expand(2, 3), r).path)
    assert {tuple(o) for _, o in outcomes} == {(0, 1)}
    # a candidate with p = 0 is never accepted, and never emitted
    chain = DraftTree.chain([0, 2], child_probs=q.expand(2, 3))
    outcomes = exact_outcomes(lambda r: verify_chain(chain, p.expand(2, 3), r).tokens)
    assert sorted(o for _, o in outcomes) == [[0], [1]]
    assert [prob for _, prob in sorted((o, pr) for pr, o in outcomes)] == [0.5, 0.5]


def test_float32_and_real_generator():
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(5, 16, generator=gen).softmax(-1)
    q = torch.rand(5, 16, generator=gen).softmax(-1)
    tree = DraftTree([3, 1, 2, 4, 5], [-1, 0, 0, 1, 1], q, children_sampled_without_replacement=True)
    first = [verify(tree, p, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert first[0] == first[1]  # reproducible from the seed
    for _ in range(50):
        result = verify(tree, p, gen)
        assert 0 <= result.next_token < 16 and result.path[0] == 0


def test_truncate_at_stop():
    tree = DraftTree([9, 1, 2, 3, 4], [-1, 0, 1, 2, 0])
    result = VerifyResult(path=[0, 1, 2, 3], accepted=[1, 2, 3], next_token=7)
    full = truncate_at_stop(result, tree)
    assert full.tokens == [1, 2, 3, 7] and full.commit == [0, 1, 2, 3] and not full.stopped
    assert full.from_draft == [True, True, True, False]
    stop = truncate_at_stop(result, tree, stop_tokens={2, 7})
    assert stop.tokens == [1, 2] and stop.commit == [0, 1] and stop.stopped
    budget = truncate_at_stop(result, tree, stop_tokens=[3], max_tokens=2)
    assert budget.tokens == [1, 2] and budget.commit == [0, 1] and not budget.stopped
    bonus_stop = truncate_at_stop(result, tree, stop_tokens=[7])
    assert bonus_stop.tokens == [1, 2, 3, 7] and bonus_stop.stopped
    assert truncate_at_stop(result, tree, max_tokens=0).tokens == []
    with pytest.raises(GenerationError, match="max_tokens"):
        truncate_at_stop(result, tree, max_tokens=-1)


def test_bad_inputs_raise():
    tree = DraftTree([0, 1, 2], [-1, 0, 0])
    with pytest.raises(GenerationError, match=r"\[n, V\] = \[3, V\]"):
        verify_tree_deterministic(tree, torch.full((2, 4), 0.25))
    with pytest.raises(GenerationError, match="needs a chain"):
        verify_chain(tree, torch.full((3, 4), 0.25))
    with pytest.raises(GenerationError, match="child_probs"):
        verify_tree_sampled(tree, torch.full((3, 4), 0.25))
    with pytest.raises(GenerationError, match="share one vocabulary"):
        verify(DraftTree.chain([0, 1], torch.full((2, 5), 0.2)), torch.full((2, 4), 0.25))
    with pytest.raises(GenerationError, match="out of range"):
        verify_tree_deterministic(tree, torch.full((3, 2), 0.5))
    with pytest.raises(GenerationError, match="sums to"):
        verify_tree_deterministic(tree, torch.zeros(3, 4))
    with pytest.raises(GenerationError, match="generator"):
        verify_tree_deterministic(tree, torch.full((3, 4), 0.25), generator=3)
