"""Speculative decoding + watermark. High-detectability mode: the exact distribution of the
first tokens (every draft sample, coin and residual draw enumerated) equals watermarked
autoregressive sampling, with repeated-context masks along draft paths; a negative control
(verification on unwatermarked p) fails the same check. Fast mode: acceptance unchanged.
After rejections the watermark state equals sequential decoding's. A chi-square test of
nl.generate (sps + watermark vs autoregressive + watermark) on a tiny model."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import pytest
import torch

import nimblelm as nl
from nimblelm.generation.sampling import SamplingConfig, probabilities
from nimblelm.generation.speculative import engine
from nimblelm.generation.speculative.tree import DraftTree
from nimblelm.generation.speculative.verify import exact_outcomes, verify
from nimblelm.generation.watermark import SynthID, WatermarkSession
from nimblelm.generation.watermark.speculative import SpeculativeWatermark

from ...conftest import build

VOCAB = 3


def nontrivial_keys() -> list[int]:
    """The first key pair under which, in every context, no two of the 3 tokens share all
    their g-values (else a layer, or top-k, could leave p unchanged: vacuous checks)."""
    from nimblelm.generation.watermark.hashing import g_values, layer_seeds

    for first in range(100, 5000, 2):
        g = g_values(layer_seeds([first, first + 1]), torch.tensor([[0], [1], [2]]), torch.arange(VOCAB))
        if all(len({tuple(g[c, :, t].tolist()) for t in range(VOCAB)}) == VOCAB for c in range(3)):
            return [first, first + 1]
    raise AssertionError("no usable keys")


CONFIG = SynthID(keys=nontrivial_keys(), ngram_len=2)  # H = 1 on 3 tokens: contexts repeat within a round
PROMPT = (0, 1, 0)


class Table:
    """A random processed distribution for every context (a tiny 'language model')."""

    def __init__(self, seed: int, config: SamplingConfig):
        self.seed, self.config, self.cache = seed, config, {}

    def __call__(self, context: tuple) -> torch.Tensor:
        if context not in self.cache:
            gen = torch.Generator().manual_seed(hash((self.seed,) + context) % 2**61)
            self.cache[context] = probabilities(torch.randn(VOCAB, generator=gen, dtype=torch.float64) * 1.5,
                                                self.config)
        return self.cache[context]


def watermarked(table: Table, context: tuple, path: tuple = ()) -> torch.Tensor:
    session = WatermarkSession(CONFIG, PROMPT)
    session.sync(list(context))
    return session.distributions(table(context + path)[None], [list(path)])[0]


def chain_drafts(draft: Table, context: tuple, depth: int, watermark_q: bool):
    """(probability, tokens, child_probs) of every sampled draft chain."""
    def extend(prob, path):
        if len(path) == depth:
            rows = [watermarked(draft, context, path[:i]) if watermark_q else draft(context + path[:i])
                    for i in range(depth)]
            yield prob, list(path), torch.stack(rows + [torch.full((VOCAB,), 1.0 / VOCAB, dtype=torch.float64)])
            return
        q = watermarked(draft, context, path) if watermark_q else draft(context + path)
        for token, weight in enumerate(q.tolist()):
            if weight > 0:
                yield from extend(prob * weight, path + (token,))
    yield from extend(1.0, ())


def round_distribution(target, draft, context, depth, mode, verifier=None):
    """Exact distribution of one round's emitted tokens."""
    config = SynthID(keys=CONFIG.keys, ngram_len=CONFIG.ngram_len, speculative=mode)
    outcomes = []
    for prob, path, child_probs in chain_drafts(draft, context, depth, watermark_q=(mode == "high_detectability")):
        tree = DraftTree.chain([context[-1]] + path, child_probs)
        raw = torch.stack([target(context + tuple(path[:i])) for i in range(depth + 1)])
        session = WatermarkSession(config, PROMPT)
        session.sync(list(context))
        hook = SpeculativeWatermark(session)
        run = (lambda rng: verifier(tree, raw, rng)) if verifier else (lambda rng: hook.verify(tree, raw, rng))
        for branch, result in exact_outcomes(run):
            outcomes.append((prob * branch, tuple(result.tokens)))
    return outcomes


def prefix_distribution(outcomes, context, continue_with, length):
    dist = defaultdict(float)

    def extend(prob, seq):
        if len(seq) >= length:
            dist[seq[:length]] += prob
            return
        for token, p in enumerate(continue_with(context + seq).tolist()):
            if p > 0:
                extend(prob * p, seq + (token,))

    for prob, seq in outcomes:
        extend(prob, seq)
    return dist


def max_error(outcomes, context, target, length):
    wm_ar = lambda ctx: watermarked(target, ctx)  # noqa: E731
    got = prefix_distribution(outcomes, context, wm_ar, length)
    want = prefix_distribution([(1.0, ())], context, wm_ar, length)
    return max(abs(got.get(k, 0.0) - want.get(k, 0.0)) for k in set(got) | set(want))


@pytest.mark.parametrize("sampling", [SamplingConfig(1.0), SamplingConfig(0.7, top_k=2)])
def test_high_detectability_equals_watermarked_autoregressive_exactly(sampling):
    target, draft = Table(1, sampling), Table(2, SamplingConfig(1.2))
    errors = []
    for context in [PROMPT, PROMPT + (1, 0), PROMPT + (2,)]:
        outcomes = round_distribution(target, draft, context, 2, "high_detectability")
        assert abs(sum(p for p, _ in outcomes) - 1.0) < 1e-12
        assert {len(s) for _, s in outcomes} == {1, 2, 3}  # rejections and full acceptances
        errors += [max_error(outcomes, context, target, n) for n in (1, 2, 3)]
    assert max(errors) < 1e-12, errors
    assert watermarked(target, PROMPT).sub(target(PROMPT)).abs().max() > 1e-3  # the watermark is not a no-op


def test_deterministic_tree_high_detectability_exact():
    target = Table(3, SamplingConfig(1.0))
    config = SynthID(keys=CONFIG.keys, ngram_len=CONFIG.ngram_len)
    context = PROMPT + (1,)
    tree = DraftTree([context[-1], 0, 1, 2, 0, 1], [-1, 0, 0, 1, 1, 2])
    raw = torch.stack([target(context + tuple(tree.token_list[j] for j in tree.path_to(i)[1:]))
                       for i in range(len(tree))])
    session = WatermarkSession(config, PROMPT)
    session.sync(list(context))
    outcomes = [(p, tuple(r.tokens)) for p, r in exact_outcomes(lambda rng: SpeculativeWatermark(session).verify(tree, raw, rng))]
    assert max(max_error(outcomes, context, target, n) for n in (1, 2, 3)) < 1e-12


def test_negative_control_unwatermarked_verification_fails_the_check():
    target, draft = Table(1, SamplingConfig(1.0)), Table(2, SamplingConfig(1.2))
    outcomes = round_distribution(target, draft, PROMPT, 2, "high_detectability",
                                  verifier=lambda tree, raw, rng: verify(tree, raw, rng))
    assert max_error(outcomes, PROMPT, target, 2) > 1e-3


def test_fast_mode_keeps_the_unwatermarked_acceptance():
    target, draft = Table(1, SamplingConfig(1.0)), Table(2, SamplingConfig(1.2))
    fast = round_distribution(target, draft, PROMPT, 2, "fast")
    plain = round_distribution(target, draft, PROMPT, 2, "fast", verifier=lambda tree, raw, rng: verify(tree, raw, rng))
    lengths = lambda outs: {n: sum(p for p, s in outs if len(s) == n) for n in (1, 2, 3)}  # noqa: E731
    assert all(abs(lengths(fast)[n] - lengths(plain)[n]) < 1e-12 for n in (1, 2, 3))
    accepted = lambda outs: {s[:-1]: 0 for _, s in outs}  # noqa: E731
    assert accepted(fast).keys() == accepted(plain).keys()
    assert max_error(fast, PROMPT, target, 1) > 1e-4  # and the bonus/correction token is watermarked differently


@pytest.mark.parametrize("strategy", ["sps", "tree"])
def test_state_after_rejections_equals_sequential(monkeypatch, strategy):
    target = build("attention-tiny", vocab_size=6)
    drafter = build("attention-tiny", vocab_size=6, seed=5)  # disagrees often: many rejections
    captured = []
    original = engine.speculative_watermark
    monkeypatch.setattr(engine, "speculative_watermark", lambda *a: captured.append(original(*a)) or captured[-1])
    config = SynthID(keys=[1, 2, 3], ngram_len=3)
    prompt = [1, 2, 3, 4]
    res = nl.generate(target, prompt, max_new_tokens=40, temperature=1.0, watermark=config, strategy=strategy,
                      drafter=drafter, seed=0)
    assert res.stats.accepted_per_call < 4  # rejections happened (a round can emit up to 5 or 6)
    state = captured[0].session
    fresh = WatermarkSession(config, prompt)
    fresh.sync(prompt + res.sequences()[0])
    assert state.tokens == fresh.tokens and state.seen == fresh.seen and state.mask == fresh.mask
    assert state.mask == nl.watermark.watermark_mask(res.sequences()[0], config, prompt)


def chi_square_p(counts_a: Counter, counts_b: Counter) -> float:
    keys = [k for k in set(counts_a) | set(counts_b) if counts_a[k] + counts_b[k] >= 5]
    na, nb = sum(counts_a[k] for k in keys), sum(counts_b[k] for k in keys)
    stat = 0.0
    for k in keys:
        total = counts_a[k] + counts_b[k]
        ea, eb = total * na / (na + nb), total * nb / (na + nb)
        stat += (counts_a[k] - ea) ** 2 / ea + (counts_b[k] - eb) ** 2 / eb
    df = len(keys) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.slow
def test_sampling_statistics_match_autoregressive():
    target = build("attention-tiny", vocab_size=5)
    drafter = build("attention-tiny", vocab_size=5, seed=3)
    config = SynthID(keys=[5, 6, 7, 8], ngram_len=2)
    prompt, n = [1, 2, 1], 3000
    ar = nl.generate(target, [prompt] * n, max_new_tokens=2, temperature=0.9, watermark=config, seed=0)
    ar_counts = Counter(tuple(s) for s in ar.sequences())
    spec_counts = Counter()
    for seed in range(n):
        res = nl.generate(target, prompt, max_new_tokens=2, temperature=0.9, watermark=config, strategy="sps",
                          drafter=drafter, seed=seed)
        spec_counts[tuple(res.sequences()[0])] += 1
    assert chi_square_p(ar_counts, spec_counts) > 1e-3
    plain = nl.generate(target, [prompt] * n, max_new_tokens=2, temperature=0.9, seed=1)
    assert chi_square_p(Counter(tuple(s) for s in plain.sequences()), spec_counts) < 1e-3  # the test has power
