"""model.save / nl.load: exact round trip, safetensors only, clear errors."""

import json
import os

import pytest
import torch

import nimblelm as nl
from nimblelm.models.checkpoint import save_model

from ..conftest import build


@pytest.mark.parametrize("preset", ["attention-tiny", "mlp-attention-tiny", "moe-tiny"])
def test_round_trip_is_exact(tmp_path, preset):
    model = build(preset, dtype=torch.float32)
    model.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    loaded = nl.load(str(tmp_path))
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    tokens = torch.randint(0, 256, (2, 8))
    assert torch.equal(model(tokens).logits, loaded(tokens).logits)


def test_tokenizer_is_saved_and_loaded(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model = build("attention-tiny", dtype=torch.float32)
    model.tokenizer = tok
    model.save(str(tmp_path))
    loaded = nl.load(str(tmp_path))
    assert loaded.tokenizer.encode("hello world").ids == [1, 2]


def test_bf16_storage_loads_as_float32(tmp_path):
    model = build("attention-tiny", dtype=torch.float32)
    save_model(model, str(tmp_path), weight_dtype=torch.bfloat16)
    loaded = nl.load(str(tmp_path))
    assert loaded.embed.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.embed.weight, model.embed.weight.bfloat16().float())


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(nl.CheckpointError, match="does not exist"):
        nl.load(str(tmp_path / "nope"))
    with pytest.raises(nl.CheckpointError, match="config.json is missing"):
        nl.load(str(tmp_path))


def test_malformed_config_and_weights(tmp_path):
    build("attention-tiny", dtype=torch.float32).save(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(nl.CheckpointError, match="not valid JSON"):
        nl.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 32, "num_heads": 4}))
    with pytest.raises(nl.CheckpointError, match="does not fit"):
        nl.load(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(nl.CheckpointError, match="not a readable safetensors file"):
        nl.load(str(tmp_path))
