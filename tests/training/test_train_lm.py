"""Corpus building, token batches, the training loop (exact resume) and torchrun DDP."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import nimblelm as nl
from nimblelm.errors import NimbleError
from nimblelm.training.corpus import build_corpus, split_of
from nimblelm.training.data import TokenData, write_token_stream
from nimblelm.training.loop import TrainConfig, learning_rate, train
from nimblelm.training.train_lm import lm_loss
from nimblelm.training.train_lm import main as train_lm_main

TINY_SET = ["--preset", "attention-tiny", "--set", "vocab_size=300", "--batch-size", "2", "--seq-len", "16",
            "--eval-batches", "2", "--warmup", "2", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    for i in range(40):
        sub = root / ("pkg" if i % 3 else "test")
        sub.mkdir(exist_ok=True)
        body = "".join(f"def func_{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(30))
        (sub / f"mod{i}.py").write_text(body)
    (root / "pkg" / "latin1.py").write_bytes(b"# caf\xe9 is not utf-8\nx = 1\n")
    (root / "pkg" / "notes.txt").write_text("ignored")
    return str(root)


@pytest.fixture(scope="module")
def corpus_dir(source_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("corpus"))
    build_corpus(out, source_dir, vocab_size=300)
    return out


def test_split_is_by_file_and_deterministic(source_dir, corpus_dir):
    files = {s: open(os.path.join(corpus_dir, f"{s}.files.txt")).read().split() for s in ("train", "val", "test")}
    everything = files["train"] + files["val"] + files["test"]
    assert len(everything) == len(set(everything)) == 41  # every .py file exactly once, .txt ignored
    for split, names in files.items():
        assert all(split_of(name) == split for name in names)
    assert split_of("json/decoder.py") == split_of("json/decoder.py")


def test_corpus_tokenizer_round_trips_and_reads_bad_utf8(corpus_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(corpus_dir, "tokenizer.json"))
    text = "def f(x):\n    return x  # ünïcode\n"
    assert tok.decode(tok.encode(text).ids) == text
    info = json.load(open(os.path.join(corpus_dir, "corpus.json")))
    assert info["eos_id"] == 0 and info["vocab_size"] <= 300
    total = sum(row["tokens"] for row in info["splits"].values())
    assert total == sum(os.path.getsize(os.path.join(corpus_dir, f"{s}.bin")) // 2 for s in ("train", "val", "test"))


def test_batches_are_pure_functions_of_step_and_rank(corpus_dir):
    data = TokenData(corpus_dir, seed=3)
    a = data.train_batch(5, 0, 1, 4, 8)
    assert a.shape == (4, 9) and a.dtype == torch.long
    assert torch.equal(a, TokenData(corpus_dir, seed=3).train_batch(5, 0, 1, 4, 8))
    assert not torch.equal(a, data.train_batch(6, 0, 1, 4, 8))
    assert not torch.equal(data.train_batch(5, 0, 2, 4, 8), data.train_batch(5, 1, 2, 4, 8))
    evals = data.eval_batches(3, 2, 8)
    assert all(b.shape[1] == 9 for b in evals) and torch.equal(evals[0], data.eval_batches(3, 2, 8)[0])


def test_missing_or_short_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(NimbleError, match="train.bin"):
        TokenData(str(tmp_path))
    write_token_stream(str(tmp_path / "train.bin"), [1, 2, 3])
    with pytest.raises(NimbleError, match="seq-len"):
        TokenData(str(tmp_path)).train_batch(0, 0, 1, 2, 16)


def test_learning_rate_warmup_then_cosine():
    cfg = TrainConfig(out_dir="x", max_steps=110, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert learning_rate(0, cfg) == pytest.approx(0.1) and learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(10, cfg) == pytest.approx(1.0) and learning_rate(60, cfg) == pytest.approx(0.55)
    assert learning_rate(110, cfg) == pytest.approx(0.1)


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return nl.LanguageModel(nl.ModelConfig.from_preset("attention-tiny", vocab_size=300))


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_lm_loss_is_the_cross_entropy_of_the_full_logits(softcap):
    """The blocked head loss (no soft-cap) and the logits path (soft-cap) both equal
    F.cross_entropy over every position's logits, loss and gradients (float64)."""
    torch.manual_seed(0)
    config = nl.ModelConfig.from_preset("attention-tiny", vocab_size=300, logit_softcap=softcap)
    model = nl.LanguageModel(config).double()
    batch = torch.randint(300, (2, 17))
    loss, _ = lm_loss(model, batch)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = torch.nn.functional.cross_entropy(model(batch[:, :-1]).logits.flatten(0, 1), batch[:, 1:].flatten())
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-12
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)


def test_training_lowers_loss_and_resume_is_exact(corpus_dir, tmp_path):
    data = TokenData(corpus_dir)
    kwargs = dict(max_steps=8, batch_size=2, seq_len=16, lr=3e-3, warmup_steps=2, eval_every=4, eval_batches=2,
                  checkpoint_every=2, progress=False)
    straight = _tiny_model()
    result = train(straight, lm_loss, data, TrainConfig(out_dir=str(tmp_path / "a"), **kwargs))
    assert result.step == 8 and not result.interrupted
    assert result.history[-1]["eval_loss"] < result.history[3]["eval_loss"] < np.log(300) + 0.5
    # interrupted after 4 steps (Ctrl-C: checkpoint written), then resumed to 8
    first = _tiny_model()
    out = str(tmp_path / "b")
    cfg = TrainConfig(out_dir=out, **kwargs)
    _stop_after(first, data, cfg, 4)
    resumed = _tiny_model(seed=123)  # different init: everything must come from the checkpoint
    result_b = train(resumed, lm_loss, data, cfg)
    assert result_b.step == 8
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    assert [r["step"] for r in log] == list(range(1, 9))


def _stop_after(model, data, cfg, steps):
    """Run ``steps`` steps of ``cfg`` and stop as an interruption would (checkpoint kept)."""
    from nimblelm.training import loop

    calls = {"n": 0}

    def loss_then_stop(module, batch):
        calls["n"] += 1
        if calls["n"] == steps:
            os.kill(os.getpid(), __import__("signal").SIGINT)
        return lm_loss(module, batch)

    result = loop.train(model, loss_then_stop, data, cfg)
    assert result.interrupted and result.step == steps


def test_train_lm_cli_writes_a_loadable_checkpoint(corpus_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train_lm_main(["--data", corpus_dir, "--out", out, "--steps", "3", *TINY_SET]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 3 and summary["eval_loss"] > 0
    model = nl.load(out)
    assert model.tokenizer is not None and model.config.vocab_size == 300
    assert train_lm_main(["--data", corpus_dir, "--evaluate", out, "--split", "val", "--eval-batches", "2",
                          "--batch-size", "2", "--seq-len", "16"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["split"] == "val" and evaluated["loss"] == pytest.approx(summary["eval_loss"], rel=1e-4)
    with pytest.raises(NimbleError, match="KEY=VALUE"):
        train_lm_main(["--data", corpus_dir, "--out", out, *TINY_SET, "--set", "nonsense"])


def test_torchrun_two_processes_stay_in_sync(corpus_dir, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "nimblelm.training.train_lm", "--data", corpus_dir, "--out", out, "--steps", "3", *TINY_SET]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True and summary["step"] == 3
    nl.load(out)
