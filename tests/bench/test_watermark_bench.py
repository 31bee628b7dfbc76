"""Smoke test of ``nimblelm bench watermark`` on a minimal setting: table and JSON shapes."""

from __future__ import annotations

import json

import pytest

from nimblelm.cli import main


@pytest.mark.slow  # ~10-20 s: trains a Bayesian detector and times five decoding modes
def test_watermark_bench_smoke(tmp_path, capsys):
    out = tmp_path / "wm.json"
    code = main(["bench", "watermark", "--texts", "2", "--lengths", "25,40", "--temperatures", "1.0",
                 "--timing-tokens", "8", "--repeats", "1", "--null-samples", "50", "--fast-rows", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "TPR at 1% FPR" in table and "sps+wm(fast)" in table
    results = json.loads(out.read_text())
    assert len(results["rows"]) == 6  # 2 lengths x speculative off / high_detectability / fast
    assert {r["speculative"] for r in results["rows"]} == {"off", "high_detectability", "fast"}
    for row in results["rows"]:
        assert set(row["tpr"]) == {"mean", "weighted_mean", "bayesian"}
        assert all(0.0 <= v <= 1.0 for v in row["tpr"].values())
    assert results["plot"] is None or (tmp_path / "wm.png").exists()
    assert set(results["timing"]) == {"ar", "ar+wm", "sps", "sps+wm(high_detectability)", "sps+wm(fast)"}


def test_bad_lengths_is_an_error(capsys):
    assert main(["bench", "watermark", "--lengths", "25,500"]) == 2
    assert "lengths" in capsys.readouterr().err
