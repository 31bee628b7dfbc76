"""Smoke test of `nimblelm bench decode` on the tiny size."""

import json

import pytest
import torch

pytest.importorskip("transformers")

import nimblelm as nl  # noqa: E402
from nimblelm.bench import decode  # noqa: E402


def test_decode_bench_tiny_writes_json(tmp_path, capsys):
    out = tmp_path / "decode.json"
    code = decode.main(["--sizes", "tiny", "--new-tokens", "4", "--prompt-len", "6", "--repeats", "1",
                        "--bandwidth-mb", "8", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "nl/HF" in printed and "tiny" in printed
    data = json.loads(out.read_text())
    run = data["runs"][0]
    assert run["size"] == "tiny" and run["tokens_match"] is True
    assert run["hf_tokens_per_s"] > 0 and run["nimblelm_tokens_per_s"] > 0 and run["bound_tokens_per_s"] > 0
    assert len(run["hf_seconds"]) == len(run["nimblelm_seconds"]) == 1
    assert data["bandwidth"]["best_gb_s"] > 0 and data["machine"]["torch_threads"] >= 1


def test_unknown_size_is_an_error(capsys):
    assert decode.main(["--sizes", "7b"]) == 2
    assert "unknown size" in capsys.readouterr().err


def test_weight_bytes_count_the_head_once():
    tied = nl.LanguageModel(nl.ModelConfig.from_preset("attention-tiny"))
    untied = nl.LanguageModel(nl.ModelConfig.from_preset("attention-tiny", tie_embeddings=False))
    assert decode.weight_bytes_per_token(tied) == 4 * tied.num_parameters()
    row = 4 * untied.config.hidden_size
    embed = 4 * untied.embed.weight.numel()
    assert decode.weight_bytes_per_token(untied) == 4 * untied.num_parameters() - embed + row
