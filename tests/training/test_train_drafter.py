"""nimblelm train drafter: every kind learns its target (loss falls, acceptance rises over
untrained heads, output stays lossless), the saved drafter loads with nl.load_drafter, and a
resumed run ends with exactly the weights of an uninterrupted one."""

import json
import os

import pytest
import torch

import nimblelm as nl
from nimblelm.training import train_drafter
from nimblelm.training.data import TokenData, write_token_stream
from nimblelm.training.loop import TrainConfig, train
from nimblelm.training.train_lm import lm_loss

VOCAB = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A corpus that is a noisy permutation cycle (x -> perm[x] with probability 0.9) and a
    tiny attention target trained on it for a few steps (so its greedy text is the cycle)."""
    root = tmp_path_factory.mktemp("drafter")
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(VOCAB, generator=gen)
    ids = [0]
    for _ in range(12000):
        noisy = torch.rand(1, generator=gen).item() > 0.9
        ids.append(int(torch.randint(0, VOCAB, (1,), generator=gen)) if noisy else int(perm[ids[-1]]))
    os.makedirs(root / "corpus")
    write_token_stream(str(root / "corpus" / "train.bin"), ids[:10000])
    write_token_stream(str(root / "corpus" / "val.bin"), ids[10000:])
    torch.manual_seed(0)
    target = nl.LanguageModel(nl.ModelConfig.from_preset("attention-tiny", vocab_size=VOCAB))
    train(target, lm_loss, TokenData(str(root / "corpus")),
          TrainConfig(out_dir=str(root / "target_run"), max_steps=50, batch_size=8, seq_len=32, lr=1e-2,
                      warmup_steps=5, eval_every=0, checkpoint_every=0, progress=False))
    target.eval().save(str(root / "target"))
    return root, nl.load(str(root / "target"))


def args(root, kind, out, steps=30, *extra):
    return ["--target", str(root / "target"), "--kind", kind, "--data", str(root / "corpus"), "--out", str(out),
            "--steps", str(steps), "--batch-size", "8", "--seq-len", "32", "--lr", "1e-2", "--warmup", "5",
            "--eval-every", "0", "--eval-batches", "2", "--checkpoint-every", "0", "--no-progress", *extra]


def mean_tau(target, strategy, drafter, prompts):
    taus = []
    for prompt in prompts:
        res = nl.generate(target, prompt, max_new_tokens=16, strategy=strategy, drafter=drafter)
        assert torch.equal(res.tokens, nl.generate(target, prompt, max_new_tokens=16).tokens)
        taus.append(res.stats.accepted_per_call)
    return sum(taus) / len(taus)


def losses(out):
    with open(os.path.join(out, "train_log.jsonl")) as fh:
        return [json.loads(line)["loss"] for line in fh]


@pytest.mark.parametrize("kind", ["medusa", "hydra", "eagle", "sps"])
def test_training_raises_acceptance(setup, tmp_path, kind, capsys):
    root, target = setup
    assert train_drafter.main(args(root, kind, tmp_path / kind)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kind"] == kind and summary["step"] == 30 and not summary["interrupted"]
    history = losses(tmp_path / kind)
    assert sum(history[-5:]) / 5 < 0.7 * history[0]
    trained = nl.load_drafter(str(tmp_path / kind), kind)
    cfg = target.config
    if kind == "sps":
        untrained = nl.LanguageModel(trained.model.config)
        assert trained.model.config.num_layers == 1
    else:
        untrained = type(trained)(cfg.hidden_size, cfg.vocab_size)
    prompts = [torch.randint(0, VOCAB, (5,)).tolist() for _ in range(3)]
    for strategy in (["eagle", "eagle2"] if kind == "eagle" else [kind]):
        tau_trained, tau_untrained = mean_tau(target, strategy, trained, prompts), \
            mean_tau(target, strategy, untrained, prompts)
        assert tau_trained > tau_untrained + 1.0, (strategy, tau_trained, tau_untrained)


def test_resume_gives_identical_weights(setup, tmp_path):
    """EAGLE (its feature noise uses the RNG): 12 steps at once == 5 steps, stop, resume to 12."""
    root, _ = setup
    extra = ["--checkpoint-every", "5"]
    train_drafter.main(args(root, "eagle", tmp_path / "once", 12))
    train_drafter.main(args(root, "eagle", tmp_path / "split", 5, *extra))
    assert os.path.isdir(tmp_path / "split" / "checkpoint")
    train_drafter.main(args(root, "eagle", tmp_path / "split", 12, *extra))
    once = nl.load_drafter(str(tmp_path / "once"), "eagle").state_dict()
    split = nl.load_drafter(str(tmp_path / "split"), "eagle").state_dict()
    for name in once:
        assert torch.equal(once[name], split[name]), name
    assert len(losses(tmp_path / "split")) == 12


def test_bad_arguments(setup, tmp_path):
    root, _ = setup
    with pytest.raises(SystemExit):
        train_drafter.main(args(root, "tree", tmp_path / "x"))
    with pytest.raises(nl.NimbleError, match="--num-layers must be in 1..4"):
        train_drafter.main(args(root, "sps", tmp_path / "x", 2, "--num-layers", "9"))


@pytest.mark.parametrize("softcap", [None, 20.0])
def test_head_distillation_equals_the_soft_cross_entropy_of_the_head_logits(softcap):
    """The blocked head loss (no soft-cap) and the logits path (soft-cap) give the loss,
    gradient and agreement of soft_cross_entropy(target_logits(...)) (float64)."""
    from nimblelm.generation.speculative.drafters.heads import target_logits

    torch.manual_seed(1)
    config = nl.ModelConfig.from_preset("attention-tiny", vocab_size=VOCAB, logit_softcap=softcap)
    target = nl.LanguageModel(config).double().eval().requires_grad_(False)
    hidden = torch.randn(2, 5, config.hidden_size, dtype=torch.float64, requires_grad=True)
    probs = torch.randn(2, 6, VOCAB, dtype=torch.float64).softmax(-1)[:, 1:]  # a strided view
    ce, acc = train_drafter.head_distillation(target, hidden, probs)
    ce.backward()
    got = hidden.grad.clone()
    hidden.grad = None
    logits = target_logits(target, hidden)
    ref = -(probs * logits.log_softmax(-1)).sum(-1).mean()  # float64 (soft_cross_entropy is float32)
    ref.backward()
    tol = 1e-12 if softcap is None else 1e-6  # the soft-cap path is soft_cross_entropy itself
    assert abs(ce.item() - ref.item()) < tol and acc == train_drafter.agreement(logits, probs)
    assert torch.allclose(got, hidden.grad, atol=tol, rtol=1e-10 if softcap is None else 1e-5)
