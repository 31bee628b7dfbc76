"""Mixer-layer options not covered by the presets (every preset already runs through
tests/models/test_lm.py and tests/generation/test_speculative.py)."""

import pytest
import torch

import nimblelm as nl

from ..conftest import build


def assert_decode_matches_full(model, length=19, prefill=6):
    tokens = torch.randint(0, model.config.vocab_size, (2, length))
    cache = model.make_cache(2, length)
    parts = [model(tokens[:, :prefill], cache=cache).logits]
    parts += [model(tokens[:, t:t + 1], cache=cache).logits for t in range(prefill, length)]
    torch.testing.assert_close(torch.cat(parts, 1), model(tokens).logits, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("feature_map", ["identity", "elu", "taylor"])
def test_linear_attention_feature_maps(feature_map):
    assert_decode_matches_full(build("linear-attn-tiny", extra={"feature_map": feature_map}))


def test_unknown_feature_map_is_a_config_error():
    with pytest.raises(nl.ConfigError, match="feature_map must be"):
        build("linear-attn-tiny", extra={"feature_map": "relu"})


def test_recurrent_state_does_not_grow_with_context():
    model = build("gla-tiny")
    small, large = model.make_cache(1, 16), model.make_cache(1, 4096)
    assert small.nbytes() == large.nbytes()
