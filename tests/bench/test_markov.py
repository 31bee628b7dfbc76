"""Markov probe: chain sampler against its definition, the entropy-rate / unigram references,
and the quick run (a 1-layer attention model gets close to the entropy rate)."""

import json
import math

import numpy as np
import pytest
import torch

from nimblelm.bench import markov
from nimblelm.models.lm import LanguageModel


@pytest.mark.parametrize("p,q", [(0.2, 0.3), (0.5, 0.8), (0.9, 0.6)])
def test_chain_transitions_and_stationary_start(p, q):
    chains = markov.sample_chains(4000, 50, p, q, np.random.default_rng(0)).numpy()
    assert set(np.unique(chains)) <= {0, 1}
    prev, nxt = chains[:, :-1].ravel(), chains[:, 1:].ravel()
    assert abs(nxt[prev == 0].mean() - p) < 0.01  # P(1 | 0) = p
    assert abs(1 - nxt[prev == 1].mean() - q) < 0.01  # P(0 | 1) = q
    pi_one = p / (p + q)
    assert abs(chains[:, 0].mean() - pi_one) < 0.03 and abs(chains[:, -1].mean() - pi_one) < 0.03


def test_reference_losses():
    # p + q = 1: the next token does not depend on the current one, so rate == unigram exactly
    assert markov.entropy_rate(0.3, 0.7) == pytest.approx(markov.unigram_loss(0.3, 0.7), abs=1e-15)
    assert markov.entropy_rate(0.5, 0.5) == pytest.approx(math.log(2))
    # the rate is below the unigram loss for any dependent chain, on both sides of p + q = 1
    for p, q in [(0.2, 0.3), (0.5, 0.8)]:
        assert markov.entropy_rate(p, q) < markov.unigram_loss(p, q) - 0.04
    # the per-test-set references converge to the analytic ones
    chains = markov.sample_chains(3000, 200, 0.5, 0.8, np.random.default_rng(1))
    oracle, unigram = markov.reference_losses(chains, 0.5, 0.8)
    assert oracle == pytest.approx(markov.entropy_rate(0.5, 0.8), abs=3e-3)
    assert unigram == pytest.approx(markov.unigram_loss(0.5, 0.8), abs=3e-3)


def test_untrained_model_is_not_near_the_optimum():
    """Negative control for the metric: fresh untied weights predict ~uniformly, worse than
    unigram. (A fresh TIED model already leans to repeating the current token, since its logits
    are e_i . norm(e_current): that beats unigram on this p + q < 1 chain.) One fresh model's
    loss scatters around ln 2 by +-0.03 with its random draw, so the mean over 8 is compared."""
    chains = markov.sample_chains(256, 64, 0.2, 0.3, np.random.default_rng(2))
    losses = []
    for seed in range(8):
        torch.manual_seed(seed)
        model = LanguageModel(markov.markov_config("untied-1L", 16, 64, "gla"))
        with torch.no_grad():
            losses.append(float(markov.next_token_loss(model, chains)))
    _, unigram = markov.reference_losses(chains, 0.2, 0.3)
    assert sum(losses) / len(losses) > unigram + 0.005


def test_variants_build_what_they_say():
    tied = LanguageModel(markov.markov_config("tied-1L", 16, 64, "gla"))
    untied = LanguageModel(markov.markov_config("untied-1L", 16, 64, "gla"))
    deep = LanguageModel(markov.markov_config("tied-2L", 16, 64, "gla"))
    rec = LanguageModel(markov.markov_config("recurrent-1L", 16, 64, "gla"))
    assert tied.lm_head is None and untied.lm_head is not None
    assert len(tied.blocks) == 1 and len(deep.blocks) == 2
    assert type(tied.blocks[0].mixer).__name__ == "Attention" and tied.blocks[0].mixer.num_heads == 1
    assert type(rec.blocks[0].mixer).__name__ == "GatedLinearAttention"


def test_quick_run_approaches_the_entropy_rate(tmp_path):
    out = tmp_path / "markov.json"
    assert markov.main(["--quick", "--json", str(out), "--out", str(tmp_path)]) == 0
    (row,) = json.loads(out.read_text())["runs"]
    assert row["test_loss"] - row["test_oracle_loss"] < 0.01, row
    assert row["gap_closed"] > 0.9, row
    assert (tmp_path / "markov.md").exists() and (tmp_path / "markov_loss.png").stat().st_size > 1000


def test_bad_chain_is_a_usage_error(capsys):
    assert markov.main(["--quick", "--chains", "0.5:1.2"]) == 2
    assert "(0, 1)" in capsys.readouterr().err


def test_paper_model_logit_is_tied_readout_of_the_residual_stream():
    """With the block weights zeroed, z_n = x_n e + p_n, so the logit is <e, x_n e + p_n> + b
    (tied) or <a, ...> + b (untied): checks the binary embedding and the readout by hand."""
    from nimblelm.bench.markov_model import PaperMarkovModel

    torch.manual_seed(0)
    tokens = torch.tensor([[0, 1, 1, 0, 1]])
    for tied in (True, False):
        model = PaperMarkovModel(8, 16, num_layers=1, tied=tied).double()
        with torch.no_grad():
            for p in model.blocks.parameters():
                p.zero_()
            model.b.fill_(0.25)
        readout = model.e if tied else model.a
        z = tokens[0, :, None].double() * model.e + model.pos[:5]
        expected = z @ readout + 0.25
        logits = model(tokens)
        torch.testing.assert_close(logits[0, :, 1], expected, rtol=0, atol=1e-12)
        assert torch.equal(logits[0, :, 0], torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="recurrent-1L"):
        markov.resolve(markov.build_parser().parse_args(["--arch", "paper", "--variants", "recurrent-1L"]))
