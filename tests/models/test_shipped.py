"""The models and drafters shipped in nimblelm/assets load by name and decode losslessly."""

import pytest
import torch

import nimblelm as nl
from nimblelm.models.checkpoint import shipped_model_names

NAMES = shipped_model_names()
STRATEGY_KIND = {"sps": "sps", "medusa": "medusa", "hydra": "hydra", "eagle": "eagle", "eagle2": "eagle"}


def test_the_two_code_models_are_shipped():
    assert NAMES == ["nimble-code-attn", "nimble-code-hybrid"]


@pytest.mark.parametrize("name", NAMES)
def test_shipped_model_generates_identically_with_every_drafter(name):
    model = nl.load(name).eval()
    assert model.tokenizer is not None and model.config.vocab_size == 8192
    prompt = model.tokenizer.encode("def read_config(path):\n    with open(path) as fh:\n").ids
    reference = nl.generate(model, prompt, max_new_tokens=16).tokens
    for strategy, kind in STRATEGY_KIND.items():
        drafter = nl.load_drafter(name, kind)
        out = nl.generate(model, prompt, max_new_tokens=16, strategy=strategy, drafter=drafter)
        assert torch.equal(out.tokens, reference), strategy
