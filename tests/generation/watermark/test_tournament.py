"""Tournament transform: equals match-by-match enumeration; non-distortionary by exact
enumeration over all g assignments (and the distortionary mode fails that check); mean
g-value matches theory, exactly and through the real hash."""

from __future__ import annotations

import itertools

import pytest
import torch

from nimblelm.generation.watermark import SynthID, WatermarkSession
from nimblelm.generation.watermark.hashing import g_values
from nimblelm.generation.watermark.tournament import tournament, tournament_reference


def random_p(vocab: int, seed: int, zeros: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(vocab, generator=gen, dtype=torch.float64) + 0.05
    p[:zeros] = 0.0
    return p / p.sum()


@pytest.mark.parametrize("num_competitors", [2, 3, 4])
def test_closed_form_equals_match_enumeration(num_competitors):
    for seed in range(6):
        p = random_p(4, seed, zeros=seed % 2)
        g = torch.randint(0, 2, (3, 4), generator=torch.Generator().manual_seed(seed))
        want = tournament_reference(p.tolist(), g.tolist(), num_competitors)
        got = tournament(p, g, num_competitors)
        assert float((got - torch.tensor(want, dtype=torch.float64)).abs().max()) < 1e-13


def average_over_all_g(p: torch.Tensor, layers: int, num_competitors: int) -> torch.Tensor:
    vocab = p.numel()
    total = torch.zeros_like(p)
    cases = list(itertools.product([0, 1], repeat=layers * vocab))
    for bits in cases:
        total += tournament(p, torch.tensor(bits).reshape(layers, vocab), num_competitors)
    return total / len(cases)


@pytest.mark.parametrize("vocab, layers", [(3, 2), (2, 3), (4, 2)])
def test_non_distortionary_by_exact_enumeration(vocab, layers):
    for seed, zeros in [(0, 0), (1, 1)]:
        p = random_p(vocab, seed, zeros)
        avg = average_over_all_g(p, layers, 2)
        assert float((avg - p).abs().max()) < 1e-15


@pytest.mark.parametrize("num_competitors", [3, 4])
def test_distortionary_mode_fails_the_same_check(num_competitors):
    p = random_p(3, 0)
    avg = average_over_all_g(p, 2, num_competitors)
    assert float((avg - p).abs().max()) > 1e-3


@pytest.mark.parametrize("vocab", [2, 3, 5, 8])
def test_mean_g_matches_theory_exactly(vocab):
    p = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
    for n, theory in [(2, 0.5 + 0.25 * (1 - 1 / vocab)), (3, 7 / 8 - 3 / (8 * vocab))]:
        cases = list(itertools.product([0, 1], repeat=vocab))
        mean_g = sum(float((tournament(p, torch.tensor([bits]), n) * torch.tensor(bits)).sum()) for bits in cases)
        assert mean_g / len(cases) == pytest.approx(theory, abs=1e-14)


@pytest.mark.parametrize("vocab, num_competitors", [(4, 2), (10, 2), (4, 3)])
def test_mean_g_of_sampled_tokens_through_the_real_hash(vocab, num_competitors):
    """Uniform p over V tokens, a fresh context per position: the mean layer-1 g-value of the
    tokens drawn from the watermarked distribution matches theory within 4 sigma."""
    config = SynthID(keys=[12345, 999], ngram_len=3, num_competitors=num_competitors)
    n = 20000
    gen = torch.Generator().manual_seed(vocab)
    contexts = torch.randint(0, 10**6, (n, 2), generator=gen)
    g = g_values(config.seeds, contexts, torch.arange(vocab))  # [n, 2, V]
    probs = tournament(torch.full((n, vocab), 1.0 / vocab, dtype=torch.float64), g[:, :1], num_competitors)
    tokens = torch.multinomial(probs, 1, generator=gen)[:, 0]
    mean = float(g[torch.arange(n), 0, tokens].double().mean())
    theory = 0.5 + 0.25 * (1 - 1 / vocab) if num_competitors == 2 else 7 / 8 - 3 / (8 * vocab)
    assert abs(mean - theory) < 4 * (theory * (1 - theory) / n) ** 0.5
    unused = float(g[torch.arange(n), 1, tokens].double().mean())  # layer 2 was not applied: fair
    assert abs(unused - 0.5) < 4 * (0.25 / n) ** 0.5


def test_zero_probability_tokens_stay_zero_and_rows_sum_to_one():
    config = SynthID(keys=list(range(30)))
    session = WatermarkSession(config, [1, 2, 3, 4, 5])
    p = torch.softmax(torch.randn(3, 50, dtype=torch.float64), -1)
    p[:, 10:20] = 0
    p = p / p.sum(-1, keepdim=True)
    out = session.distributions(p, [[], [7], [7, 8]])
    assert torch.all(out[:, 10:20] == 0)
    assert torch.allclose(out.sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert float((out - p).abs().max()) > 1e-3  # and it did change something


def test_fast_loop_equals_layer_by_layer():
    from nimblelm.generation.watermark.tournament import tournament_layer

    p = torch.softmax(torch.randn(4, 100, dtype=torch.float64), -1)
    g = torch.randint(0, 2, (4, 30, 100))
    want = p
    for layer in range(30):
        want = tournament_layer(want, g[:, layer])
    assert float((tournament(p, g) - want / want.sum(-1, keepdim=True)).abs().max()) < 1e-14  # numpy path
    torch_path = tournament(p.float(), g).double()  # float32 takes the torch loop
    assert float((torch_path - want / want.sum(-1, keepdim=True)).abs().max()) < 1e-5
