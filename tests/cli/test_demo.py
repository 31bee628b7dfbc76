"""`nimblelm demo` on a tiny model directory laid out like a shipped model."""

import json

import pytest

import nimblelm as nl
from nimblelm.cli import main as cli_main
from nimblelm.errors import NimbleError

from ..shipped_like import make_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("shipped") / "nimble-code-tiny")


def test_demo_runs_every_strategy_identically(model_dir, tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert cli_main(["demo", "--model", model_dir, "--max-new-tokens", "24", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for strategy in ("autoregressive", "sps", "lookup", "medusa", "hydra", "eagle", "eagle2"):
        assert strategy in text
    assert " NO" not in text and "sampled (eagle2" in text
    report = json.loads(out.read_text())
    assert all(row["identical"] for row in report["greedy"].values())
    assert report["greedy"]["autoregressive"]["tau"] == 1.0
    assert len(report["sampled"]["tokens"]) == 24


def test_demo_errors_are_one_line(model_dir, capsys):
    assert cli_main(["demo", "--model", model_dir, "--prompt-index", "7"]) == 2
    assert "--prompt-index must be in [0, 2)" in capsys.readouterr().err
    assert cli_main(["demo", "--model", model_dir, "--strategies", "sps,warp"]) == 2
    with pytest.raises(NimbleError, match="shipped model"):
        nl.load("no-such-shipped-model")
