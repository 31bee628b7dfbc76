"""MQAR: generator semantics against a per-example oracle, the power-law gap distribution,
the labelled-positions-only logits, and the quick benchmark (attention solves a small MQAR, a
conv-only model does not)."""

import json

import numpy as np
import pytest
import torch

from nimblelm.bench import mqar, mqar_train
from nimblelm.bench.mqar_data import IGNORE, gap_probabilities, multiquery_ar
from nimblelm.bench.mqar_train import MQARSetting, TrainOptions, labelled_logits, mixer_state_bytes, mqar_config
from nimblelm.errors import ConfigError
from nimblelm.models.lm import LanguageModel


def _check_example(tokens: list[int], labels: list[int], vocab: int, k: int) -> None:
    """The oracle: what one Zoology MQAR example must look like, checked position by position."""
    half = vocab // 2
    keys, values = tokens[0:2 * k:2], tokens[1:2 * k:2]
    assert all(1 <= key < half for key in keys) and len(set(keys)) == k
    assert all(half <= v < vocab for v in values) and len(set(values)) == k
    assert all(lab == IGNORE for lab in labels[:2 * k])
    answer = dict(zip(keys, values))
    queried = []
    for pos in range(2 * k, len(tokens)):
        if labels[pos] != IGNORE:
            assert (pos - 2 * k) % 2 == 0, "queries sit on even offsets of the query region"
            assert labels[pos] == answer[tokens[pos]]
            queried.append(tokens[pos])
    assert sorted(queried) == sorted(keys), "every key is queried exactly once"


@pytest.mark.parametrize("vocab,length,k", [(8192, 64, 4), (8192, 256, 16), (64, 16, 4), (20, 40, 8)])
def test_examples_match_the_zoology_semantics(vocab, length, k):
    batch = multiquery_ar(300, vocab_size=vocab, seq_len=length, num_kv_pairs=k, seed=3)
    assert batch.inputs.shape == batch.labels.shape == (300, length)
    assert int(batch.inputs.min()) >= 0 and int(batch.inputs.max()) < vocab
    for tokens, labels in zip(batch.inputs.tolist(), batch.labels.tolist()):
        _check_example(tokens, labels, vocab, k)


def test_seeded_and_seed_dependent():
    a = multiquery_ar(50, vocab_size=512, seq_len=64, num_kv_pairs=4, seed=7)
    b = multiquery_ar(50, vocab_size=512, seq_len=64, num_kv_pairs=4, seed=7)
    c = multiquery_ar(50, vocab_size=512, seq_len=64, num_kv_pairs=4, seed=8)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, c.inputs)


def test_gaps_follow_the_power_law_without_replacement():
    """k = 2 over 4 slots: the ordered pair (gap of key 1, gap of key 2) must have the
    sequential without-replacement probability p[g1] p[g2] / (1 - p[g1])."""
    n, length, k = 60_000, 12, 2  # context 4, space 4
    batch = multiquery_ar(n, vocab_size=64, seq_len=length, num_kv_pairs=k, seed=0, power_a=0.3)
    keys = batch.inputs[:, 0:4:2]
    counts = np.zeros((4, 4))
    for tokens, labels, row_keys in zip(batch.inputs.tolist(), batch.labels.tolist(), keys.tolist()):
        gap_of = {tokens[pos]: (pos - 4) // 2 for pos in range(4, length) if labels[pos] != IGNORE}
        counts[gap_of[row_keys[0]], gap_of[row_keys[1]]] += 1
    p = gap_probabilities(4, 0.3)
    expected = np.array([[0 if i == j else p[i] * p[j] / (1 - p[i]) for j in range(4)] for i in range(4)])
    assert np.abs(counts / n - expected).max() < 0.006  # ~4 standard errors at n = 60k


def test_bad_sizes_name_the_option():
    with pytest.raises(ConfigError, match="seq_len"):
        multiquery_ar(1, seq_len=15)
    with pytest.raises(ConfigError, match="seq_len >= 64"):
        multiquery_ar(1, seq_len=32, num_kv_pairs=16)
    with pytest.raises(ConfigError, match="vocab_size"):
        multiquery_ar(1, vocab_size=8, seq_len=32, num_kv_pairs=4)


def test_labelled_logits_equal_the_full_head_at_those_positions():
    setting, opts = MQARSetting("gla", 32, 32, 4), TrainOptions(vocab_size=128)
    model = LanguageModel(mqar_config(setting, opts)).double()
    batch = multiquery_ar(4, vocab_size=128, seq_len=32, num_kv_pairs=4, seed=1)
    logits, targets = labelled_logits(model, batch.inputs, batch.labels)
    full = model(batch.inputs).logits  # [B, T, V]
    mask = batch.labels != IGNORE
    assert logits.shape == (16, 128)
    torch.testing.assert_close(logits, full[mask], rtol=0, atol=1e-12)
    assert torch.equal(targets, batch.labels[mask])
    assert [b.ffn for b in model.blocks] == [None, None]  # Zoology's model has no MLP


def test_labelled_loss_is_the_cross_entropy_of_the_labelled_logits():
    setting, opts = MQARSetting("gla", 32, 32, 4), TrainOptions(vocab_size=128)
    model = LanguageModel(mqar_config(setting, opts)).double()
    batch = multiquery_ar(4, vocab_size=128, seq_len=32, num_kv_pairs=4, seed=1)
    loss = mqar_train.labelled_loss(model, batch.inputs, batch.labels)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = torch.nn.functional.cross_entropy(*labelled_logits(model, batch.inputs, batch.labels))
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-12
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)


def test_state_bytes():
    opts = TrainOptions(vocab_size=64, num_heads=2)
    attn = LanguageModel(mqar_config(MQARSetting("attention", 32, 64, 4), opts))
    assert mixer_state_bytes(attn, 64) == 2 * 2 * 64 * 16 * 4  # K and V, 2 heads, 64 tokens, head 16, fp32
    local = LanguageModel(mqar_config(MQARSetting("local_attention", 32, 64, 4), opts))
    assert mixer_state_bytes(local, 64) == 2 * 2 * 16 * 16 * 4  # the window (16) bounds it
    gla = LanguageModel(mqar_config(MQARSetting("gla", 32, 64, 4), opts))
    assert mixer_state_bytes(gla, 64) == 2 * 8 * 16 * 4  # S [H, Dk = head/2, Dv]


def test_quick_attention_solves_small_mqar(tmp_path):
    out = tmp_path / "mqar.json"
    assert mqar.main(["--quick", "--json", str(out), "--out", str(tmp_path)]) == 0
    best = json.loads(out.read_text())["best"]
    assert [r["mixer"] for r in best] == ["attention"]
    assert best[0]["accuracy"] >= 0.95, best[0]
    assert (tmp_path / "mqar.md").exists() and (tmp_path / "mqar_accuracy_vs_state.png").stat().st_size > 1000


def test_negative_control_conv_only_cannot_recall():
    """Layer 1 a second short conv (4-token window): no way to look 8+ tokens back, so the
    same budget that solves the task with attention must leave it far from solved."""
    opts = TrainOptions(vocab_size=64, num_train=2000, num_test=200, batch_size=32, max_steps=200,
                        time_limit_s=20, eval_every=50)
    record = mqar_train.train_one(MQARSetting("short_conv", 32, 16, 2), 1e-2, opts)
    assert record["accuracy"] < 0.6, record


def test_a_run_cut_to_the_time_budget_says_time(monkeypatch):
    """The horizon fit shortens the cosine schedule to the time budget, so the run finishes
    its (shortened) schedule before max_steps and before the deadline: its record must say
    "time", not "max_steps". A clock that ticks 9.9 ms per training step (1 s budget) makes it
    exact: the fit lands on step 101, at 0.9999 s."""
    ticks = {"n": 0}

    class TickClock:
        def __init__(self, seconds):
            self.seconds = seconds

        def elapsed(self):
            return 0.0099 * ticks["n"]

        def expired(self):
            return self.elapsed() >= self.seconds

    labelled_hidden = mqar_train.labelled_hidden

    def ticking_hidden(*args, **kwargs):
        ticks["n"] += torch.is_grad_enabled()  # training steps tick, evaluations do not
        return labelled_hidden(*args, **kwargs)

    monkeypatch.setattr(mqar_train, "Deadline", TickClock)
    monkeypatch.setattr(mqar_train, "labelled_hidden", ticking_hidden)
    opts = TrainOptions(vocab_size=64, num_train=500, num_test=50, batch_size=8, max_steps=100_000,
                        time_limit_s=1.0, eval_every=10_000)
    record = mqar_train.train_one(MQARSetting("short_conv", 16, 16, 2), 1e-2, opts)
    assert record["steps"] == 101 and record["stop"] == "time", record


def test_resume_skips_finished_runs(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    fake = dict(mixer="attention", d_model=32, seq_len=16, num_kv_pairs=2, lr=0.01, accuracy=1.0, train_loss=0.0,
                steps=1, seconds=0.0, stop="target", curve=[], params=1, state_bytes=1, decode_tokens_per_s=1.0)
    out.write_text(json.dumps({"runs": [fake]}))
    monkeypatch.setattr(mqar, "train_one", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert mqar.main(["--quick", "--json", str(out), "--resume"]) == 0
    assert json.loads(out.read_text())["best"][0]["accuracy"] == 1.0


def test_report_renders_earlier_runs_without_training(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    runs = [dict(mixer=m, d_model=32, seq_len=16, num_kv_pairs=2, lr=lr, accuracy=acc, train_loss=0.0, steps=1,
                 seconds=1.0, stop="time", curve=[], params=1, state_bytes=64, decode_tokens_per_s=1.0)
            for m, lr, acc in [("attention", 0.01, 0.99), ("gla", 0.01, 0.5), ("gla", 0.003, 0.7)]]
    text = json.dumps({"options": {"lrs": [0.003, 0.01]}, "runs": runs})
    out.write_text(text)
    monkeypatch.setattr(mqar, "train_one", lambda *a, **k: pytest.fail("--report trained"))
    assert mqar.main(["--report", "--json", str(out), "--out", str(tmp_path)]) == 0
    table = (tmp_path / "mqar.md").read_text()
    assert "| gla | 32 | 16 | 2 | 70.0% | 0.003 |" in table and "| attention | 32 | 16 | 2 | 99.0% |" in table
    assert out.read_text() == text  # only read: a running sweep keeps writing it
    assert mqar.main(["--report", "--json", str(tmp_path / "missing.json")]) == 2


def test_report_merges_sweeps_of_one_budget_and_refuses_mixed_budgets(tmp_path, monkeypatch, capsys):
    def run(mixer, d, acc):
        return dict(mixer=mixer, d_model=d, seq_len=16, num_kv_pairs=2, lr=0.01, accuracy=acc, train_loss=0.0,
                    steps=1, seconds=1.0, stop="time", curve=[], params=1, state_bytes=64 * d,
                    decode_tokens_per_s=1.0)
    budget = dict(vocab_size=64, num_train=10, num_test=5, batch_size=2, max_steps=300, eval_every=25)
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps({"options": {**budget, "d_models": [32]}, "runs": [run("gla", 32, 0.5)]}))
    b.write_text(json.dumps({"options": {**budget, "d_models": [64]}, "runs": [run("gla", 64, 0.8),
                                                                               run("attention", 64, 1.0)]}))
    c.write_text(json.dumps({"options": {**budget, "max_steps": 1200}, "runs": [run("gla", 32, 0.9)]}))
    monkeypatch.setattr(mqar, "train_one", lambda *a, **k: pytest.fail("--report trained"))
    assert mqar.main(["--report", "--json", f"{a},{b}", "--out", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "mqar.md").read_text()
    assert "| gla | 32 | 16 | 2 | 50.0% |" in table and "| gla | 64 | 16 | 2 | 80.0% |" in table
    assert "| attention | 64 |" in table
    capsys.readouterr()
    assert mqar.main(["--report", "--json", f"{a},{c}"]) == 2  # 300 vs 1200 steps: not one table
    assert "max_steps=1200" in capsys.readouterr().err
    assert mqar.main(["--quick", "--json", f"{a},{b}"]) == 2  # training writes one file


def test_workers_give_the_sequential_sweep_runs(tmp_path):
    """--workers 2 trains settings in spawned processes; every run is seeded, so the records
    equal the single-process sweep's (timings aside), and the parent writes them all."""
    common = ["--quick", "--mixers", "attention,short_conv", "--lrs", "1e-2,3e-3", "--max-steps", "40",
              "--eval-every", "20", "--time-limit", "600"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert mqar.main(common + ["--json", str(one)]) == 0
    assert mqar.main(common + ["--json", str(two), "--workers", "2"]) == 0
    timing = ("seconds", "decode_tokens_per_s")

    def runs(path):
        return sorted(({k: v for k, v in r.items() if k not in timing} for r in json.loads(path.read_text())["runs"]),
                      key=lambda r: (r["mixer"], r["lr"]))

    assert len(runs(one)) == 4 and runs(one) == runs(two)
    assert mqar.main(common + ["--json", str(two), "--workers", "0"]) == 2


def test_best_over_learning_rates():
    runs = [dict(mixer="gla", d_model=64, seq_len=64, num_kv_pairs=4, lr=lr, accuracy=acc, curve=[])
            for lr, acc in [(1e-3, 0.4), (3e-3, 0.9), (1e-2, 0.2)]]
    (row,) = mqar.best_rows(runs)
    assert row["lr"] == 3e-3 and row["accuracy"] == 0.9 and "curve" not in row


def test_horizon_fit_ignores_slow_first_steps_and_keeps_refitting():
    """A run whose first two steps took most of a second (one-off costs) and then 10 ms per
    step: the fit at step 10 must not end the run early, and later fits extend it."""
    from types import SimpleNamespace

    from nimblelm.bench.probe_train import HorizonFit

    clock = {"t": 0.0}

    class FakeDeadline:
        seconds = 2.0

        def elapsed(self):
            return clock["t"]

    schedule = SimpleNamespace(total_steps=10_000)
    fit = HorizonFit(FakeDeadline())
    for step in range(1, 60):
        clock["t"] = 0.4 * min(step, 2) + 0.01 * max(0, step - 2)
        fit.update(step, schedule, max_steps=10_000)
    # 1.2 s left after step 2 at 10 ms per step: ~120 more steps, not 2 s / (0.9 s / 10 steps) = 22
    assert 115 <= schedule.total_steps <= 125
    clock["t"] = 0.8 + 0.01 * 78
    fit.update(80, schedule, max_steps=50)  # the next fit (10, 20, 40, 80, ...): capped, but never below step + 1
    assert schedule.total_steps == 81


def test_mixer_options_reach_the_model_and_keep_runs_apart(tmp_path, monkeypatch):
    """--mixer-option feature_map=identity builds linear_attn with the identity map, and its runs
    neither resume from nor merge with the runs without options."""
    out = tmp_path / "r.json"
    plain = dict(mixer="linear_attn", d_model=32, seq_len=16, num_kv_pairs=2, lr=0.01, accuracy=1.0, train_loss=0.0,
                 steps=1, seconds=0.0, stop="target", curve=[], params=1, state_bytes=1, decode_tokens_per_s=1.0)
    out.write_text(json.dumps({"runs": [plain]}))
    seen = []

    def fake_train(setting, lr, opts, data=None, progress=None):
        model = mqar_train.LanguageModel(mqar_train.mqar_config(setting, opts))
        seen.append(model.blocks[1].mixer.feature_map)
        return {**plain, "accuracy": 0.5}

    monkeypatch.setattr(mqar, "train_one", fake_train)
    monkeypatch.setattr(mqar, "decode_throughput", lambda *a, **k: 1.0)
    argv = ["--quick", "--mixers", "linear_attn", "--json", str(out), "--resume",
            "--mixer-option", "feature_map=identity"]
    assert mqar.main(argv) == 0
    assert seen == ["identity"]
    saved = json.loads(out.read_text())
    assert [r.get("mixer_options") for r in saved["runs"]] == [None, {"feature_map": "identity"}]
    assert {r["mixer"]: r["accuracy"] for r in saved["best"]} == {"linear_attn": 1.0,
                                                                 "linear_attn[feature_map=identity]": 0.5}
    assert mqar.main(argv) == 0 and seen == ["identity"]  # resumed: not trained again


def test_mixer_option_values_and_errors():
    assert mqar.parse_mixer_options(["feature_map=identity", "expand=2", "flag=true"]) == {
        "feature_map": "identity", "expand": 2, "flag": True}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        mqar.parse_mixer_options(["feature_map"])


def test_accuracy_grid_has_one_row_per_mixer_and_dashes_for_missing_settings():
    def run(mixer, d, L, K, acc):
        return dict(mixer=mixer, d_model=d, seq_len=L, num_kv_pairs=K, lr=3e-3, accuracy=acc, curve=[])

    runs = [run("gla", 32, 64, 4, 0.5), run("attention", 32, 64, 4, 0.99), run("attention", 64, 64, 4, 0.995),
            run("gla", 64, 128, 8, 0.25)]
    lines = mqar.format_grid({"best": mqar.best_rows(runs)}).splitlines()
    assert lines[0] == "| mixer | 64:4 d32 | 64:4 d64 | 128:8 d64 |"
    assert lines[2] == "| attention | 99.0 | 99.5 | - |"  # attention first: the MIXERS order
    assert lines[3] == "| gla | 50.0 | - | 25.0 |"
    assert len(lines) == 4
