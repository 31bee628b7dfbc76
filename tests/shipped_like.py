"""A tiny model directory laid out like a shipped model: model + tokenizer + held-out prompts
+ drafters/{sps,medusa,hydra,eagle} (untrained drafters: fast, and every strategy must still
reproduce the autoregressive output)."""

import json

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import nimblelm as nl
from nimblelm.drafter_io import save_drafter
from nimblelm.generation.speculative.drafters import EagleHead, HydraHeads, MedusaHeads

TEXT = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n" * 20


def make_model_dir(root) -> str:
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
    prompts = [{"file": "x.py", "line": 1, "text": TEXT[:60]}, {"file": "y.py", "line": 3, "text": TEXT[30:90]}]
    (root / "prompts.json").write_text(json.dumps(prompts))
    return str(root)
