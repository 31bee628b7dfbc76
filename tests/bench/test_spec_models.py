"""`nimblelm bench spec --model DIR`: every strategy on a trained-layout model directory."""

import json

import pytest

from nimblelm.bench.spec import main as spec_main

from ..shipped_like import make_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("shipped") / "nimble-code-tiny")


def test_every_strategy_and_transformers_rows(model_dir, tmp_path, capsys):
    out = tmp_path / "spec.json"
    assert spec_main(["--model", model_dir, "--prompts", "2", "--new-tokens", "12", "--temperatures", "0,0.7",
                      "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    rows = {(r["temperature"], r["row"]): r for r in results["rows"]}
    expected = ["autoregressive", "sps", "lookup", "medusa", "hydra", "eagle", "eagle2",
                "hf autoregressive", "hf lookup", "hf assisted (sps draft)"]
    for temperature in (0.0, 0.7):
        assert [name for (t, name) in rows if t == temperature] == expected
    for name in expected:
        greedy = rows[(0.0, name)]
        assert greedy["identical"] is True, name
        assert greedy["tokens_per_s"] > 0 and greedy["tau"] >= 1.0
        assert rows[(0.7, name)]["identical"] is None  # sampled rows are not compared token by token
    assert rows[(0.0, "autoregressive")]["tau"] == 1.0 and rows[(0.0, "autoregressive")]["speedup"] == 1.0
    assert all(0 <= p <= 1 for p in rows[(0.0, "eagle2")]["accept_by_depth"])
    cost = results["verify_cost"][model_dir]
    assert cost["sizes"][0] == 1 and cost["sizes"][-1] == 64 and len(cost["ms"]) == len(cost["sizes"])
    assert all(ms > 0 for ms in cost["ms"])
    out = capsys.readouterr().out
    assert "eagle2" in out and "n-token tree" in out
