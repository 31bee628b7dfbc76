"""``nimblelm watermark detect``: verdicts on watermarked / plain text, JSON output, keys from a
file or the environment and never printed, clear errors for malformed keys and empty text."""

from __future__ import annotations

import json

import pytest
import torch

import nimblelm as nl
from nimblelm.cli import main

from ..conftest import build

KEYS = [1000 + 7 * k for k in range(30)]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """A word-level tokenizer over 'w0'..'w255' (decode/encode round-trips ids exactly), one
    watermarked and one unwatermarked text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    directory = tmp_path_factory.mktemp("wm")
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    model = build("attention-tiny", dtype=torch.float32)
    config = nl.watermark.SynthID(keys=KEYS)
    marked = nl.generate(model, [5, 6, 7, 8], max_new_tokens=80, temperature=1.0, watermark=config, seed=0)
    plain = nl.generate(model, [5, 6, 7, 8], max_new_tokens=80, temperature=1.0, seed=1)
    paths = {}
    for name, res in (("marked", marked), ("plain", plain)):
        ids = res.sequences()[0]
        assert tokenizer.encode(tokenizer.decode(ids)).ids == ids
        paths[name] = directory / f"{name}.txt"
        paths[name].write_text(tokenizer.decode(ids))
    (directory / "empty.txt").write_text("  \n")
    paths["empty"] = directory / "empty.txt"
    (directory / "keys.json").write_text(json.dumps({"keys": KEYS, "ngram_len": 5}))
    paths["keys"] = directory / "keys.json"
    paths["dir"] = directory
    return paths


def run(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_no_keys(text: str) -> None:
    assert not any(str(k) in text for k in KEYS[1:]), "a key was printed"


def test_detects_watermarked_and_not_plain(texts, capsys):
    code, out, err = run(capsys, ["watermark", "detect", "--keys", str(texts["keys"]), "--tokenizer", str(texts["dir"]),
                                  str(texts["marked"]), str(texts["plain"])])
    assert code == 0
    lines = out.strip().splitlines()
    assert "marked.txt" in lines[0] and lines[0].endswith("fpr 0.01)") and " watermarked" in lines[0]
    assert "not watermarked" in lines[1]
    assert_no_keys(out + err)


def test_json_and_keys_from_environment(texts, capsys, monkeypatch):
    monkeypatch.setenv("MY_WM_KEYS", " ".join(map(str, KEYS)))
    code, out, err = run(capsys, ["watermark", "detect", "--keys-env", "MY_WM_KEYS", "--tokenizer", str(texts["dir"]),
                                  "--json", "--detector", "weighted_mean", str(texts["marked"])])
    assert code == 0
    record = json.loads(out)
    assert record["is_watermarked"] and record["p_value"] < 1e-6 and record["detector"] == "weighted_mean"
    assert set(record) >= {"score", "p_value", "is_watermarked", "scored_tokens", "file"}
    assert_no_keys(out + err)


@pytest.mark.parametrize("content, message", [
    ("[1, 2, oops]", "not valid JSON"),
    ("1 2 x3", "non-integer"),
    ('{"key": [1, 2]}', "'keys' list"),
    ("", "empty"),
    ("[]", "non-empty list"),
])
def test_malformed_key_file_is_a_clear_error_that_hides_the_keys(texts, capsys, tmp_path, content, message):
    bad = tmp_path / "bad.keys"
    bad.write_text(content)
    code, out, err = run(capsys, ["watermark", "detect", "--keys", str(bad), "--tokenizer", str(texts["dir"]),
                                  str(texts["marked"])])
    assert code == 2 and message in err and "nimblelm: error:" in err
    assert "oops" not in err and "x3" not in err


def test_empty_text_missing_keys_and_tokenizer_errors(texts, capsys, monkeypatch, tmp_path):
    code, _, err = run(capsys, ["watermark", "detect", "--keys", str(texts["keys"]), "--tokenizer", str(texts["dir"]),
                                str(texts["empty"])])
    assert code == 2 and "empty" in err
    monkeypatch.delenv("NIMBLELM_WATERMARK_KEYS", raising=False)
    code, _, err = run(capsys, ["watermark", "detect", "--tokenizer", str(texts["dir"]), str(texts["marked"])])
    assert code == 2 and "NIMBLELM_WATERMARK_KEYS" in err
    code, _, err = run(capsys, ["watermark", "detect", "--keys", str(texts["keys"]), "--tokenizer", str(tmp_path),
                                str(texts["marked"])])
    assert code == 2 and "tokenizer.json" in err
