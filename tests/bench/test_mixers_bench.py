"""Smoke test of `nimblelm bench mixers --quick` and unit checks of its pieces."""

import json
import sys
from unittest import mock

import pytest
import torch

pytest.importorskip("transformers")

from nimblelm.bench import mixers, mixers_ops  # noqa: E402
from nimblelm.layers.registry import MIXERS  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixers") / "mixers.json"
    threads = torch.get_num_threads()
    code = mixers.main(["--quick", "--json", str(out)])
    assert torch.get_num_threads() == threads  # --quick's single thread is not left behind
    return code, json.loads(out.read_text())


def test_quick_run_measures_every_registered_mixer(quick_run, capsys):
    code, data = quick_run
    assert code == 0
    assert [r["mixer"] for r in data["mixers"]] == [m for m in mixers.ORDER if m in MIXERS] + sorted(
        set(MIXERS) - set(mixers.ORDER))
    assert data["machine"]["torch_threads"] == 1 and data["machine"]["loadavg_start"] is not None
    assert data["matmul"]["best_gflop_s"] > 0
    for row in data["mixers"]:
        assert "error" not in row, row
        for e in row["prefill"]:
            assert e["fast_s"] > 0 and e["loop_s"] > 0 and e["loop_speedup"] > 0
            assert e["max_abs_fast_minus_loop"] < 1e-4, (row["mixer"], e["T"])
            if e.get("op_naive_s") is not None:
                assert e["op_max_abs_fast_minus_naive"] < 1e-4, (row["mixer"], e["T"])
        assert [d["context"] for d in row["decode"]] == data["settings"]["decode_contexts"]
        assert all(d["per_token_s"] > 0 for d in row["decode"])


def test_state_bytes_fixed_for_recurrent_and_growing_for_attention(quick_run):
    _, data = quick_run
    short, long = data["settings"]["decode_contexts"]
    for row in data["mixers"]:
        first, last = (d["state_bytes"] for d in row["decode"])
        if row["kind"] == "recurrent":
            assert first == last > 0
        else:
            assert last * short == first * long
    local = next(r for r in data["mixers"] if r["mixer"] == "local_attention")
    window = data["settings"]["window"]
    assert local["decode"][-1]["state_bytes_window_bound"] == local["decode"][-1]["state_bytes"] * window // long


def test_chunk_op_flops_and_naive_ops(quick_run):
    _, data = quick_run
    rows = {r["mixer"]: r for r in data["mixers"]}
    for name in ("linear_attn", "based", "retnet", "gla", "mamba2", "deltanet", "gated_deltanet"):
        for e in rows[name]["prefill"]:
            assert e["op_gflop_s"] > 0 and 0 < e["op_fraction_of_matmul"] and e["op_flops_formula"]
            # like for like: the best op run against the best matmul, medians against medians
            assert e["op_gflop_s"] == pytest.approx(e["op_flops"] / e["op_fast_min_s"] / 1e9)
            assert e["op_fraction_of_matmul"] == pytest.approx(e["op_gflop_s"] / data["matmul"]["best_gflop_s"])
            assert e["op_fraction_of_matmul_median"] == pytest.approx(
                e["op_gflop_s_median"] / data["matmul"]["median_gflop_s"])
            assert e["op_gflop_s"] >= e["op_gflop_s_median"]
    for name in ("mamba", "rglru", "short_conv"):
        assert all(e["op_naive_s"] > 0 and "op_flops" not in e for e in rows[name]["prefill"])
    assert all("op_fast_s" not in e for e in rows["attention"]["prefill"])


def test_transformers_comparison(quick_run):
    _, data = quick_run
    runs = {r["model"]: r for r in data["hf"]["runs"]}
    assert sorted(runs) == ["mamba", "mamba2", "rglru"]
    for name, row in runs.items():
        assert "error" not in row, row
        if "note" in row:  # the converter is not there (yet): a note, not a failure
            continue
        assert row["max_abs_logit_diff"] < 1e-4
        assert all(e["ratio"] > 0 for e in row["prefill"])
        assert row["decode"]["ratio"] > 0 and row["decode"]["max_abs_logit_diff_last_step"] < 1e-4


def test_naive_budget_skips_with_an_estimate(capsys):
    results = mixers.run_mixers_bench(quick=True, mixers="gla", no_hf=True, naive_budget=1e-9)
    first, second = results["mixers"][0]["prefill"]
    assert first["loop_s"] > 0  # the shortest T always runs (nothing to extrapolate from)
    assert second["loop_s"] is None and second["loop_estimated_s"] > 0 and "estimated" in second["loop_note"]
    assert second["op_naive_s"] is None and second["op_naive_estimated_s"] > 0
    assert "~" in mixers.format_tables(results)


def test_naive_baseline_is_its_faster_thread_count():
    """With 2 threads the loops are also timed at 1 thread and the faster run is the baseline,
    so a loop of tiny ops slowed down by threading cannot inflate the speedup."""
    opts = {"naive_budget": 100.0, "repeats": 2}

    def fake(seconds_per_thread):
        def fn():
            time_spent[0] += seconds_per_thread[torch.get_num_threads()]
        return fn

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with mock.patch.object(mixers.time, "perf_counter", side_effect=lambda: time_spent[0]):
            time_spent = [0.0]
            slower_on_two, _ = mixers._budgeted("loop", fake({1: 1.0, 2: 3.0}), None, 4, None, opts)
            time_spent = [0.0]
            faster_on_two, _ = mixers._budgeted("loop", fake({1: 1.0, 2: 0.5}), None, 4, None, opts)
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(threads)
    assert slower_on_two["median_s"] == 1.0 and slower_on_two["threads_used"] == 1
    assert slower_on_two["median_s_at_threads"] == 3.0 and slower_on_two["median_s_1_thread"] == 1.0
    assert faster_on_two["median_s"] == 0.5 and faster_on_two["threads_used"] == 2


def test_unknown_mixer_is_an_error(capsys):
    assert mixers.main(["--quick", "--mixers", "nope"]) == 2
    assert "unknown mixer" in capsys.readouterr().err


def test_flop_formulas():
    # gla: 2 C^2 (Dk + Dv) + 4 C Dk Dv per chunk, head and row; T=128, C=64 -> 2 chunks
    assert mixers_ops.chunk_flops("gla", 1, 128, 2, 4, 8, 64) == 2 * 2 * (2 * 64 * 64 * 12 + 4 * 64 * 32)
    assert mixers_ops.gla_chunk_len(20, 64) == 24  # chunk_gla shrinks the chunk for short inputs (to 8s)
    assert mixers_ops.chunk_flops("based", 1, 64, 1, 4, 8, 64) == 2 * 64 * 64 * 12 + 4 * 64 * 15 * 8
    assert mixers_ops.chunk_flops("delta", 1, 64, 1, 4, 8, 64) == 64 * 64 * (5 * 4 + 3 * 8) + 6 * 64 * 32
    with pytest.raises(ValueError):
        mixers_ops.chunk_flops("scan", 1, 64, 1, 4, 8, 64)


def test_plot_uses_matplotlib_when_present(tmp_path):
    fig, ax1, ax2 = mock.MagicMock(), mock.MagicMock(), mock.MagicMock()
    pyplot = mock.MagicMock()
    pyplot.subplots.return_value = (fig, (ax1, ax2))
    matplotlib = mock.MagicMock(pyplot=pyplot)
    results = {"mixers": [{"mixer": "gla", "prefill": [{"T": 16, "fast_s": 0.001}],
                           "decode": [{"context": 16, "per_token_s": 0.001}]}, {"mixer": "bad", "error": "x"}]}
    path = str(tmp_path / "m.png")
    with mock.patch.dict(sys.modules, {"matplotlib": matplotlib, "matplotlib.pyplot": pyplot}):
        assert mixers.write_plot(results, path) == path
    fig.savefig.assert_called_once_with(path, dpi=120)
    assert ax1.plot.called and ax2.plot.called
    assert mixers.write_plot(results, None) is None
