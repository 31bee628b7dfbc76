"""`nimblelm demo` on a tiny model directory laid out like a shipped model (model + tokenizer
+ held-out prompts + drafters/{sps,medusa,hydra,eagle}); untrained drafters keep it fast
while every strategy still has to reproduce the autoregressive output."""

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import nimblelm as nl
from nimblelm.cli import main as cli_main
from nimblelm.drafter_io import save_drafter
from nimblelm.errors import NimbleError
from nimblelm.generation.speculative.drafters import EagleHead, HydraHeads, MedusaHeads

TEXT = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n" * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shipped") / "nimble-code-tiny"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    torch.manual_seed(0)
    config = nl.ModelConfig.from_preset("attention-tiny", vocab_size=tokenizer.get_vocab_size())
    model = nl.LanguageModel(config)
    model.tokenizer = tokenizer
    model.save(str(root))
    draft = nl.LanguageModel(nl.ModelConfig.from_preset("attention-tiny", vocab_size=config.vocab_size, num_layers=1))
    draft.save(str(root / "drafters" / "sps"))
    for kind, heads in {"medusa": MedusaHeads, "hydra": HydraHeads, "eagle": EagleHead}.items():
        save_drafter(heads(config.hidden_size, config.vocab_size), str(root / "drafters" / kind))
    prompts = [{"file": "x.py", "line": 1, "text": TEXT[:60]}]
    (root / "prompts.json").write_text(json.dumps(prompts))
    return str(root)


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
    assert "--prompt-index must be in [0, 1)" in capsys.readouterr().err
    assert cli_main(["demo", "--model", model_dir, "--strategies", "sps,warp"]) == 2
    with pytest.raises(NimbleError, match="shipped model"):
        nl.load("no-such-shipped-model")
