"""``nimblelm train lm``: train a LanguageModel on a corpus directory (next-token cross-entropy,
plus the MoE load-balancing loss where the model has MoE layers).

    nimblelm train lm --data data/code --preset code-attn --out runs/code-attn --steps 2000
    torchrun --nproc_per_node=2 -m nimblelm.training.train_lm --data ... (same options)

The final checkpoint (``--out``: config.json + model.safetensors + tokenizer.json) loads with
``nl.load``; ``--out/checkpoint`` holds the resumable training state (rerun the same command
to continue after an interruption).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

from ..errors import NimbleError
from ..models import LanguageModel, ModelConfig
from ..models.lm import ModelOutput
from ..ops.losses import at_least_float32, linear_cross_entropy
from .data import TokenData
from .loop import TrainConfig, add_loop_arguments, config_from_args, evaluate, train

AUX_LOSS_WEIGHT = 0.01


def next_token_ce(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, ModelOutput]:
    """(mean next-token cross-entropy over batch [B, T + 1], the model's output). ``model`` is a
    LanguageModel, possibly wrapped (DistributedDataParallel). Without a logit soft-cap the
    loss comes from the final hidden states through the blocked
    :func:`~nimblelm.ops.losses.linear_cross_entropy` (the [B*T, V] logits are never formed)."""
    core = getattr(model, "module", model)
    targets = batch[:, 1:].flatten()
    if isinstance(core, LanguageModel) and core.config.logit_softcap is None:
        out = model(batch[:, :-1], logits_to_keep=1)  # the head runs on one position only
        return linear_cross_entropy(out.hidden.flatten(0, 1), core.head_weight, targets), out
    out = model(batch[:, :-1])
    return F.cross_entropy(at_least_float32(out.logits.flatten(0, 1)), targets), out


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token cross-entropy over batch [B, T + 1] (+ weighted MoE aux loss)."""
    ce, out = next_token_ce(model, batch)
    if out.aux_loss is None:
        return ce, {}
    return ce + AUX_LOSS_WEIGHT * out.aux_loss, {"aux_loss": float(out.aux_loss)}


def ce_only(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    return next_token_ce(model, batch)[0], {}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nimblelm train lm", description="Train a language model on a corpus directory.")
    p.add_argument("--data", required=True, metavar="DIR", help="corpus directory (nimblelm train corpus)")
    p.add_argument("--evaluate", metavar="MODEL", help="only report MODEL's loss on --split (no training)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split for --evaluate")
    p.add_argument("--preset", help="model preset (see nimblelm.preset_names())")
    p.add_argument("--config", metavar="JSON", help="a config.json instead of --preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--out", metavar="DIR", help="run directory (required unless --evaluate)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: one epoch of the train split)")
    add_loop_arguments(p, batch_size=16, lr=2e-3, min_lr=2e-4, warmup=100, weight_decay=0.1, eval_batches=16)
    return p


def model_config(args) -> ModelConfig:
    if bool(args.preset) == bool(args.config):
        raise NimbleError("pass exactly one of --preset NAME or --config FILE")
    config = ModelConfig.from_preset(args.preset) if args.preset else ModelConfig.from_json(args.config)
    values = config.to_dict()
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or key not in values:
            raise NimbleError(f"--set {item!r}: expected KEY=VALUE with KEY a config field")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return ModelConfig.from_dict(values)


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    data = TokenData(args.data, seed=args.seed)
    config = model_config(args)
    tokenizer = None
    if data.tokenizer_path:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(data.tokenizer_path)
        if tokenizer.get_vocab_size() > config.vocab_size:
            raise NimbleError(f"the corpus tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocab_size "
                              f"is {config.vocab_size}; pass --set vocab_size={tokenizer.get_vocab_size()}")
    steps = args.steps or math.ceil(data.num_tokens("train") / (args.batch_size * args.seq_len * _world()))
    train_config = config_from_args(args, steps)
    torch.manual_seed(args.seed)
    model = LanguageModel(config)
    model.tokenizer = tokenizer
    dtype = getattr(torch, args.weight_dtype)

    def save(module, out_dir):
        from ..models.checkpoint import save_model

        save_model(module, out_dir, weight_dtype=None if dtype == torch.float32 else dtype)

    os.makedirs(args.out, exist_ok=True)
    result = train(model, lm_loss, data, train_config, save=save)
    summary = {"step": result.step, "max_steps": steps, "train_loss": result.train_loss, "eval_loss": result.eval_loss,
               "parameters": sum(p.numel() for p in model.parameters()), "interrupted": result.interrupted}
    if result.ranks_in_sync is not None:
        summary["world_size"], summary["ranks_in_sync"] = _world(), result.ranks_in_sync
    if result.eval_loss is not None:
        summary["eval_perplexity"] = math.exp(result.eval_loss)
    return summary


def evaluate_model(model_dir: str, data_dir: str, split: str, batches: int, batch_size: int, seq_len: int) -> dict:
    """Mean next-token loss (nats) and perplexity of a checkpoint on a corpus split (fixed,
    evenly spaced windows: the same ones for every model)."""
    import nimblelm as nl

    model = nl.load(model_dir).eval()
    data = TokenData(data_dir)
    config = TrainConfig(out_dir=model_dir, max_steps=1, batch_size=batch_size, seq_len=seq_len,
                         eval_batches=batches)
    loss = evaluate(model, ce_only, data, config, split=split)
    tokens = min(batches * batch_size, (data.num_tokens(split) - 1) // (seq_len + 1)) * seq_len
    return {"model": model_dir, "split": split, "loss": loss, "perplexity": math.exp(loss), "tokens": tokens}


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.evaluate:
        if args.threads:
            torch.set_num_threads(args.threads)
        summary = evaluate_model(args.evaluate, args.data, args.split, args.eval_batches, args.batch_size, args.seq_len)
        print(json.dumps(summary))
        return 0
    if not args.out:
        raise NimbleError("--out DIR is required to train (or pass --evaluate MODEL)")
    summary = run(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
