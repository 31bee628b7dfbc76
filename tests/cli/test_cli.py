"""`nimblelm` CLI: happy paths and one clear error line for every bad input."""

import json
import subprocess
import sys

import pytest
import torch

import nimblelm as nl
from nimblelm.cli import main


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    nl.LanguageModel(nl.ModelConfig.from_preset("attention-tiny")).save(str(tmp_path / "ckpt"))
    return str(tmp_path / "ckpt")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_from_preset_and_checkpoint(capsys, checkpoint):
    code, out, _ = run(capsys, "generate", "--preset", "attention-tiny", "--prompt-ids", "1,2,3",
                       "--max-new-tokens", "5", "--json")
    assert code == 0
    data = json.loads(out)
    assert len(data["tokens"]) == 5 and data["stats"]["target_calls"] == 5
    code, out, err = run(capsys, "generate", "--model", checkpoint, "--prompt", "abc", "--max-new-tokens", "4")
    assert code == 0 and out.startswith("abc") and "4 tokens" in err


def test_generate_matches_library(capsys, checkpoint):
    _, out, _ = run(capsys, "generate", "--model", checkpoint, "--prompt-ids", "5 6 7", "--max-new-tokens", "6")
    expected = nl.generate(nl.load(checkpoint), [5, 6, 7], max_new_tokens=6).tokens[0].tolist()
    assert out.split() == [str(t) for t in expected]


def test_info(capsys, checkpoint):
    code, out, _ = run(capsys, "info", checkpoint)
    assert code == 0 and "parameters: " in out and "mixers: attention, attention" in out


def write_bad_config(tmp_path, checkpoint):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    (bad / "config.json").write_text("{oops")
    return str(bad)


@pytest.mark.parametrize("argv,message", [
    (["generate", "--preset", "nope", "--prompt", "x"], "unknown preset 'nope'"),
    (["generate", "--model", "/nonexistent/dir", "--prompt", "x"], "does not exist"),
    (["generate", "--model", "BADCONFIG", "--prompt", "x"], "not valid JSON"),
    (["generate", "--preset", "attention-tiny", "--prompt-ids", "1,999"], "token id 999 is out of range"),
    (["generate", "--preset", "attention-tiny", "--prompt-ids", " ".join(["1"] * 600)], "longer than the model's context"),
    (["generate", "--preset", "attention-tiny", "--prompt", "hi", "--max-new-tokens", "-3"], "max_new_tokens must be a non-negative"),
    (["generate", "--preset", "attention-tiny", "--prompt-ids", "1,x"], "--prompt-ids must be integers"),
    (["generate", "--preset", "attention-tiny", "--prompt", ""], "the prompt is empty"),
    (["info", "/nonexistent/dir"], "does not exist"),
])
def test_bad_input_gives_one_clear_line(capsys, tmp_path, checkpoint, argv, message):
    argv = [write_bad_config(tmp_path, checkpoint) if a == "BADCONFIG" else a for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nimblelm: error: ") and message in lines[0]
    assert "Traceback" not in err


def test_console_script_version():
    proc = subprocess.run([sys.executable, "-m", "nimblelm.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"nimblelm {nl.__version__}"
