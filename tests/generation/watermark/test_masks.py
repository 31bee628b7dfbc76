"""Repeated-context masks: the session (generation) and watermark_mask (detection) agree;
generation really uses them; tree paths see exactly what sequential decoding would."""

from __future__ import annotations

import random

import pytest
import torch

import nimblelm as nl
from nimblelm.generation.watermark import SynthID, WatermarkSession, watermark_mask
from nimblelm.generation.watermark import hooks, session as session_module

from ...conftest import build


def test_mask_rule_by_hand():
    config = SynthID(keys=[1], ngram_len=3)  # H = 2
    response = [5, 6, 5, 6, 5, 6, 7]
    # k=0,1: context reaches into the prompt (watermarked only if the prompt is given);
    # k=2: ctx (5,6) new; k=3: (6,5) new; k=4: (5,6) seen; k=5: (6,5) seen; k=6: (5,6) seen
    assert watermark_mask(response, config) == [False, False, True, True, False, False, False]
    assert watermark_mask(response, config, prompt=[9]) == [False, True, True, True, False, False, False]
    assert watermark_mask(response, config, prompt=[8, 9]) == [True, True, True, True, False, False, False]


def test_session_equals_detection_mask_and_tree_paths_equal_sequential():
    rng = random.Random(0)
    config = SynthID(keys=[3, 4], ngram_len=3)
    for trial in range(30):
        prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 5))]
        response = [rng.randrange(3) for _ in range(25)]
        session = WatermarkSession(config, prompt)
        session.sync(prompt + response)
        assert session.mask == watermark_mask(response, config, prompt)
        without = watermark_mask(response, config)
        assert session.mask[2:] == without[2:]
        # a tree node = accepted prefix + a path: node_states must equal a fresh session fed sequentially
        cut = rng.randrange(0, 20)
        partial = WatermarkSession(config, prompt)
        partial.sync(prompt + response[:cut])
        paths = [response[cut:cut + d] for d in range(5)]
        contexts, marked = partial.node_states(paths)
        for d, path in enumerate(paths):
            fresh = WatermarkSession(config, prompt)
            fresh.sync(prompt + response[:cut] + path)
            want, _ = fresh.node_states([[]])
            assert marked[d] == fresh.node_states([[]])[1][0]
            if marked[d]:
                assert torch.equal(contexts[d], want[0])


def recorded_masks(monkeypatch) -> list[list[bool]]:
    calls: list[list[bool]] = []
    original = hooks.apply_watermark

    def spy(config, probs, contexts, marked):
        calls.append(list(marked))
        return original(config, probs, contexts, marked)

    monkeypatch.setattr(hooks, "apply_watermark", spy)
    return calls


def test_generation_time_masks_equal_detection_masks_batched_left_padded(monkeypatch):
    """A small vocabulary makes contexts repeat; rows of a left-padded batch each use their
    own tokens; the masks applied at every step equal watermark_mask of the final text."""
    model = build("attention-tiny", vocab_size=4)
    config = SynthID(keys=[7, 8, 9], ngram_len=3)
    prompts = [[1, 2, 3], [2], [0, 1, 2, 3, 0, 1]]
    calls = recorded_masks(monkeypatch)
    res = nl.generate(model, prompts, max_new_tokens=30, temperature=1.0, watermark=config, seed=0)
    steps = torch.tensor(calls)  # [T, B]
    for b, prompt in enumerate(prompts):
        response = res.sequences()[b]
        assert steps[:, b].tolist() == watermark_mask(response, config, prompt)
        assert sum(steps[:, b].tolist()) < len(response) - 2  # repeats did occur
    alone = nl.generate(model, prompts[1], max_new_tokens=30, temperature=1.0, watermark=config, seed=0)
    assert len(alone.sequences()[0]) == 30


def test_row_result_independent_of_batch_neighbours():
    """The watermarked distribution of a row depends on that row's tokens only."""
    model = build("attention-tiny", vocab_size=16)
    config = SynthID(keys=[1, 2, 3, 4])
    sessions_a = [WatermarkSession(config, [1, 2, 3, 4, 5])]
    sessions_b = [WatermarkSession(config, [9, 9, 9]), WatermarkSession(config, [1, 2, 3, 4, 5])]
    logits = torch.randn(1, 16, dtype=torch.float64)
    cfg = nl.generation.SamplingConfig(0.8)
    a = hooks.watermarked_probabilities(sessions_a, logits, cfg)
    b = hooks.watermarked_probabilities(sessions_b, torch.cat([torch.randn(1, 16, dtype=torch.float64), logits]), cfg)
    assert torch.equal(a[0], b[1])


def test_greedy_with_watermark_is_a_clear_error():
    model = build("attention-tiny")
    with pytest.raises(nl.NimbleError, match="temperature > 0"):
        nl.generate(model, [1, 2, 3], max_new_tokens=4, watermark=SynthID(keys=[1]))
    with pytest.raises(nl.NimbleError, match="SynthID"):
        nl.generate(model, [1, 2, 3], max_new_tokens=4, temperature=1.0, watermark={"keys": [1]})
    assert session_module.check_watermark(None, None) is None
