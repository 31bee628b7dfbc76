"""Detectors: exact null p-values, calibrated thresholds, uniform p-values and nominal FPR
under the null (random and model-generated unwatermarked text, wrong keys), repeated text
does not inflate scores, watermarked text is detected, the Bayesian detector."""

from __future__ import annotations

import math

import pytest
import torch

import nimblelm as nl
from nimblelm.generation.watermark import BayesianDetector, SynthID, WatermarkError, detect, text_g_values, threshold
from nimblelm.generation.watermark.detect import binomial_tail, p_value

from ...conftest import build
from .helpers import ks_uniform_p_value

KEYS = SynthID(keys=[17 * k + 1 for k in range(30)])
WRONG = SynthID(keys=[19 * k + 2 for k in range(30)])


def test_binomial_tail_is_exact():
    for trials in (1, 7, 40):
        for s in range(trials + 2):
            want = sum(math.comb(trials, k) for k in range(s, trials + 1)) / 2 ** trials
            assert binomial_tail(s, trials) == pytest.approx(want, rel=1e-11, abs=1e-300)


@pytest.mark.parametrize("detector", ["mean", "weighted_mean"])
def test_threshold_is_the_calibrated_boundary(detector):
    for scored in (25, 100, 400):
        t = threshold(detector, scored, 30, 0.01)
        assert p_value(detector, t, scored, 30) <= 0.01 + 1e-12
        step = 1.0 / (scored * 30) if detector == "mean" else 1e-6
        assert p_value(detector, t - step, scored, 30) > 0.01


def null_texts(count: int, length: int, vocab: int = 50_000, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=gen).tolist()


@pytest.mark.parametrize("detector", ["mean", "weighted_mean"])
def test_null_p_values_uniform_and_fpr_nominal(detector):
    texts = null_texts(1000, 40)
    p = [detect(t, KEYS, detector).p_value for t in texts]
    assert ks_uniform_p_value(p) > 1e-3
    flagged = sum(x <= 0.01 for x in p)
    assert flagged <= 10 + 3 * math.sqrt(10)  # binomial(1000, 0.01) upper 3 sigma


def test_wrong_key_and_unwatermarked_model_text_are_null():
    model = build("attention-tiny", vocab_size=64)
    prompts = torch.randint(0, 64, (60, 6))
    marked = nl.generate(model, prompts, max_new_tokens=60, temperature=1.0, watermark=KEYS, seed=0)
    plain = nl.generate(model, prompts, max_new_tokens=60, temperature=1.0, seed=0)
    wrong = [detect(t, WRONG).p_value for t in marked.sequences()]
    unmarked = [detect(t, KEYS).p_value for t in plain.sequences()]
    assert ks_uniform_p_value(wrong) > 1e-3 and ks_uniform_p_value(unmarked) > 1e-3
    right = [detect(t, KEYS) for t in marked.sequences()]
    assert sum(d.is_watermarked for d in right) >= 55
    assert sum(p <= 0.01 for p in wrong + unmarked) <= 5


def test_repeated_text_does_not_inflate_the_score():
    model = build("attention-tiny", vocab_size=256)
    res = nl.generate(model, [1, 2, 3, 4, 5], max_new_tokens=40, temperature=1.0, watermark=KEYS, seed=0)
    segment = res.sequences()[0]
    once, many = detect(segment, KEYS), detect(segment * 6, KEYS)
    assert many.scored_tokens <= once.scored_tokens + 5 * KEYS.context_len  # only the junctions are new
    assert many.p_value >= once.p_value * 1e-6
    nulls = [detect(t * 8, KEYS).p_value for t in null_texts(300, 20, seed=3)]
    assert ks_uniform_p_value(nulls) > 1e-3


def test_eos_and_everything_after_is_not_scored():
    config = SynthID(keys=[1, 2, 3], eos_token_id=0)
    g, mask = text_g_values([5, 6, 7, 8, 9, 10, 0, 11, 12], config)
    assert mask.tolist() == [False] * 4 + [True, True] + [False] * 3
    assert g.shape == (9, 3)


def test_errors_are_clear():
    with pytest.raises(WatermarkError, match="empty"):
        detect([], KEYS)
    with pytest.raises(WatermarkError, match="no token"):
        detect([1, 2, 3], KEYS)
    with pytest.raises(WatermarkError, match="fpr"):
        detect(list(range(20)), KEYS, fpr=1.5)
    with pytest.raises(WatermarkError, match="detector"):
        detect(list(range(20)), KEYS, detector="median")
    with pytest.raises(WatermarkError):
        SynthID(keys=[])
    with pytest.raises(WatermarkError):
        SynthID(keys=[1, "2"])
    with pytest.raises(WatermarkError):
        SynthID(keys=[1], speculative="turbo")
    assert "keys" not in repr(SynthID(keys=[123456789])) or "123456789" not in repr(SynthID(keys=[123456789]))


def test_bayesian_detector_trains_and_is_calibrated():
    model = build("attention-tiny", vocab_size=256)
    config = SynthID(keys=list(range(1, 13)))
    prompts = torch.randint(0, 256, (40, 6), generator=torch.Generator().manual_seed(1))
    res = nl.generate(model, prompts, max_new_tokens=50, temperature=0.8, watermark=config, seed=0)
    samples = [text_g_values(t, config) for t in res.sequences()]
    detector = BayesianDetector(config.depth, null_samples=1000)
    detector.fit(samples[:20], steps=150)
    wm_scores = [detector.score(g, m) for g, m in samples[20:]]
    null = [text_g_values(t, config) for t in null_texts(200, 50, vocab=256, seed=5)]
    null_scores = [detector.score(g, m) for g, m in null]
    assert min(wm_scores) > sorted(null_scores)[-1]  # separates these cleanly
    thr = detector.threshold(46, 0.05)  # 46 scored tokens in a 50-token text
    flagged = sum(s > thr for (g, m), s in zip(null, null_scores) if int(m.sum()) == 46)
    total = sum(int(m.sum()) == 46 for _, m in null)
    assert flagged <= 0.05 * total + 3 * math.sqrt(0.05 * total) + 1
    p = [detector.p_value(g, m) for g, m in null if int(m.sum()) == 46]
    assert ks_uniform_p_value(p) > 1e-3
    res_det = detect(res.sequences()[25], config, detector=detector)
    assert res_det.is_watermarked and res_det.detector == "bayesian"
