"""``nimblelm train drafter``: train draft heads / a draft LM against a frozen target by
self-distillation on corpus text (the target's own predictions are the labels).

    nimblelm train drafter --target runs/code-attn --kind eagle --data data/code \\
        --out runs/code-attn/drafters/eagle --steps 2000

Per batch of windows x_0..x_L (LongTensor [B, L+1]) the frozen target runs once without
gradients, giving its final hidden states f_j and processed distributions p_j (softmax of
its logits at j, over token j+1). Then, per kind:

* ``medusa``: head i on f_t -> soft cross-entropy against p_{t+1+i} (token t+2+i).
* ``hydra``: head i on f_t and the embeddings of x_{t+1}..x_{t+1+i} -> same targets.
* ``eagle``: inputs [e(x_{j+1}); f_j + noise] (noise uniform in +-``noise`` * RMS(f)), the
  head predicts f_{j+1}: SmoothL1(f^_{j+1}, f_{j+1}) + 0.1 * soft CE(head(f^_{j+1}), p_{j+1}).
* ``sps``: a 1-2 layer LanguageModel (own embedding and head, same vocabulary) trained on
  KL(p_j || q_j).

``--out`` receives the drafter (``nl.load_drafter(out, kind)``; for sps a plain checkpoint),
``--out/checkpoint`` the resumable training state (rerun the same command to continue).

``--draft-vocab N`` (eagle): also write ``draft_vocab.safetensors``, the N most frequent
tokens of the corpus's train split, which the head then drafts from (FR-Spec); with
``--vocab-only`` nothing is trained, only that file is written next to an existing drafter:

    nimblelm train drafter --target nimble-code-attn --kind eagle --data data/code \
        --out src/nimblelm/assets/nimble-code-attn/drafters/eagle --draft-vocab 2048 --vocab-only
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NimbleError
from ..ops.losses import linear_soft_cross_entropy
from .data import TokenData
from .loop import add_loop_arguments, config_from_args, train

EAGLE_CE_WEIGHT = 0.1


def soft_cross_entropy(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_v probs * log_softmax(logits); logits, probs [..., V]."""
    return -(probs * logits.float().log_softmax(-1)).sum(-1).mean()


def agreement(logits: torch.Tensor, probs: torch.Tensor) -> float:
    """Fraction of rows whose argmax equals the target's argmax (greedy acceptance proxy)."""
    return float((logits.argmax(-1) == probs.argmax(-1)).float().mean())


def head_distillation(target: nn.Module, hidden: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(soft cross-entropy of the target's head on ``hidden`` [B, n, D] against ``probs``
    [B, n, V], the argmax agreement). Without a logit soft-cap the head runs a block of rows
    at a time (:func:`~nimblelm.ops.losses.linear_soft_cross_entropy`: no [B, n, V] logits);
    with one, through `target_logits`."""
    if target.config.logit_softcap is None:
        ce, argmax = linear_soft_cross_entropy(hidden, target.head_weight.detach(), probs)
        return ce, float((argmax == probs.argmax(-1)).float().mean())
    from ..generation.speculative.drafters.heads import target_logits

    logits = target_logits(target, hidden)
    return soft_cross_entropy(logits, probs), agreement(logits, probs)


class DrafterObjective(nn.Module):
    """The trainable drafter plus its frozen target; ``forward(batch [B, L+1])`` -> (loss,
    metrics). Only the drafter is a submodule (its weights alone are optimised and
    checkpointed); the target is held outside the module tree."""

    def __init__(self, kind: str, drafter: nn.Module, target: nn.Module, noise: float = 0.1):
        super().__init__()
        if kind not in ("sps", "medusa", "hydra", "eagle"):
            raise NimbleError(f"unknown drafter kind {kind!r}; choose sps, medusa, hydra or eagle")
        self.kind, self.drafter, self.noise = kind, drafter, noise
        self._target = [target.eval().requires_grad_(False)]

    @property
    def target(self) -> nn.Module:
        return self._target[0]

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            out = self.target(batch)
            feats, probs = out.hidden, out.logits.float().softmax(-1)  # [B, L+1, D], [B, L+1, V]
        return getattr(self, f"_{self.kind}_loss")(batch, feats, probs)

    def _medusa_loss(self, batch, feats, probs):
        length, losses, metrics = batch.shape[1], [], {}
        for i, head in enumerate(self.drafter.heads):
            if length - 1 - i <= 0:
                break
            ce, metrics[f"acc{i}"] = head_distillation(self.target, head(feats[:, :length - 1 - i]),
                                                       probs[:, 1 + i:])  # token t+2+i
            losses.append(ce)
        return torch.stack(losses).mean(), metrics

    def _hydra_loss(self, batch, feats, probs):
        from ..generation.speculative.drafters.heads import target_embed

        with torch.no_grad():
            embeds = target_embed(self.target, batch)  # [B, L+1, D]
        length, losses, metrics = batch.shape[1], [], {}
        for i in range(self.drafter.num_heads):
            n = length - 1 - i  # positions t = 0 .. n-1
            if n <= 0:
                break
            prev = torch.stack([embeds[:, 1 + j:1 + j + n] for j in range(i + 1)], dim=2)  # [B, n, i+1, D]
            ce, metrics[f"acc{i}"] = head_distillation(self.target, self.drafter.head(i, feats[:, :n], prev),
                                                       probs[:, 1 + i:])
            losses.append(ce)
        return torch.stack(losses).mean(), metrics

    def _eagle_loss(self, batch, feats, probs):
        from ..generation.speculative.drafters.heads import target_embed

        with torch.no_grad():
            embeds = target_embed(self.target, batch[:, 1:])  # e(x_{j+1}), j = 0 .. L-1
            inputs = feats[:, :-1]
            if self.noise and self.training:
                scale = self.noise * inputs.pow(2).mean().sqrt()
                inputs = inputs + (torch.rand_like(inputs) * 2 - 1) * scale
        pred = self.drafter(embeds, inputs)  # f^_{j+1}
        feature_loss = F.smooth_l1_loss(pred.float(), feats[:, 1:].float())
        ce, acc0 = head_distillation(self.target, pred, probs[:, 1:])
        return feature_loss + EAGLE_CE_WEIGHT * ce, {"feature_loss": float(feature_loss.detach()), "ce": float(ce.detach()),
                                                     "acc0": acc0}

    def _sps_loss(self, batch, feats, probs):
        logits = self.drafter(batch).logits.float()
        kl = (probs * (probs.clamp_min(1e-30).log() - logits.log_softmax(-1))).sum(-1).mean()
        return kl, {"acc0": agreement(logits, probs)}


def objective_loss(module: nn.Module, batch: torch.Tensor):
    """The loss_fn of :func:`~nimblelm.training.loop.train` (calls forward, so DDP syncs)."""
    return module(batch)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nimblelm train drafter",
                                description="Train draft heads or a draft LM against a frozen target (self-distillation).")
    p.add_argument("--target", required=True, metavar="DIR", help="target checkpoint directory or shipped model name")
    p.add_argument("--kind", required=True, choices=["sps", "medusa", "hydra", "eagle"])
    p.add_argument("--data", required=True, metavar="DIR", help="corpus directory (nimblelm train corpus)")
    p.add_argument("--out", required=True, metavar="DIR", help="drafter directory (e.g. TARGET/drafters/KIND)")
    p.add_argument("--steps", type=int, default=1000)
    add_loop_arguments(p, batch_size=8, lr=1e-3, min_lr=1e-4, warmup=50, weight_decay=0.0, eval_batches=8)
    p.add_argument("--num-heads", type=int, default=4, help="medusa/hydra: number of heads (draft depth)")
    p.add_argument("--num-layers", type=int, default=1,
                   help="medusa/hydra: residual blocks per head; sps: draft LM layers (1-2)")
    p.add_argument("--draft-hidden", type=int, help="sps: draft LM hidden size (default: half the target's)")
    p.add_argument("--noise", type=float, default=0.1, help="eagle: uniform feature noise, relative to the features' RMS")
    p.add_argument("--draft-vocab", type=int, metavar="N",
                   help="eagle: also write the N most frequent train tokens as the head's draft vocabulary")
    p.add_argument("--vocab-only", action="store_true", help="only write --draft-vocab's file; train nothing")
    return p


def frequent_tokens(tokens, vocab_size: int, size: int) -> torch.Tensor:
    """The ``size`` most frequent ids of a token stream (array-like of ints in [0, vocab_size)),
    ties by smaller id, returned sorted (LongTensor [size])."""
    import numpy as np

    if not 1 <= size <= vocab_size:
        raise NimbleError(f"a draft vocabulary size must be in 1..{vocab_size} (the target's vocabulary), got {size}")
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size)
    if counts.shape[0] > vocab_size:
        raise NimbleError(f"the token stream holds ids >= {vocab_size}, the target's vocabulary size")
    order = np.argsort(-counts, kind="stable")[:size]
    return torch.from_numpy(np.sort(order)).long()


def write_draft_vocab(data_dir: str, out_dir: str, size: int, vocab_size: int) -> str:
    """Write the ``size`` most frequent tokens of ``data_dir``'s train split as
    ``out_dir/draft_vocab.safetensors`` (see :mod:`nimblelm.drafter_io`); returns its path."""
    from ..drafter_io import save_draft_vocab

    ids = frequent_tokens(TokenData(data_dir).streams["train"], vocab_size, size)
    return save_draft_vocab(ids, out_dir)


def build_drafter(kind: str, target, args) -> nn.Module:
    """A fresh trainable drafter for ``target`` (heads, or a small draft LanguageModel)."""
    from ..generation.speculative.drafters import EagleHead, HydraHeads, MedusaHeads
    from ..models import LanguageModel, ModelConfig

    cfg = target.config
    if kind == "medusa":
        return MedusaHeads(cfg.hidden_size, cfg.vocab_size, args.num_heads, args.num_layers)
    if kind == "hydra":
        return HydraHeads(cfg.hidden_size, cfg.vocab_size, args.num_heads, args.num_layers)
    if kind == "eagle":
        return EagleHead(cfg.hidden_size, cfg.vocab_size, rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps)
    if not 1 <= args.num_layers <= 4:
        raise NimbleError(f"a draft LM should be small: --num-layers must be in 1..4, got {args.num_layers}")
    hidden = args.draft_hidden or max(32, cfg.hidden_size // 2)
    heads = max(1, hidden // 64)
    if hidden % heads or (hidden // heads) % 2:
        raise NimbleError(f"--draft-hidden {hidden} must split into {heads} heads of even size")
    return LanguageModel(ModelConfig(vocab_size=cfg.vocab_size, hidden_size=hidden, num_layers=args.num_layers,
                                     num_heads=heads, mixer_pattern=["attention"], ffn_pattern=["swiglu"],
                                     max_seq_len=cfg.max_seq_len))


def save_fn(kind: str, target, weight_dtype: torch.dtype | None):
    """The final-artefact writer for :func:`train`: the drafter alone, in ``out_dir``."""

    def save(module: nn.Module, out_dir: str) -> None:
        drafter = module.drafter
        if kind == "sps":
            from ..models.checkpoint import save_model

            drafter.tokenizer = target.tokenizer
            save_model(drafter, out_dir, weight_dtype=weight_dtype)
        else:
            from ..drafter_io import save_drafter

            save_drafter(drafter, out_dir, weight_dtype=weight_dtype)

    return save


def run(args) -> dict:
    from ..models.checkpoint import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_model(args.target)
    data = TokenData(args.data, seed=args.seed)
    if data.tokenizer_path and target.tokenizer is not None and \
            target.tokenizer.get_vocab_size() != _tokenizer_size(data.tokenizer_path):
        raise NimbleError(f"the corpus at {args.data} uses a different tokenizer than the target {args.target}; "
                          "train the drafter on a corpus tokenized for the target")
    if (args.draft_vocab is not None or args.vocab_only) and args.kind != "eagle":
        raise NimbleError("--draft-vocab / --vocab-only apply to --kind eagle only")
    if args.vocab_only:
        if args.draft_vocab is None:
            raise NimbleError("--vocab-only needs --draft-vocab N")
        path = write_draft_vocab(args.data, args.out, args.draft_vocab, target.config.vocab_size)
        return {"kind": args.kind, "draft_vocab": path, "size": args.draft_vocab}
    torch.manual_seed(args.seed)
    drafter = build_drafter(args.kind, target, args)
    objective = DrafterObjective(args.kind, drafter, target, noise=args.noise)
    config = config_from_args(args, args.steps, min_lr=min(args.min_lr, args.lr))
    dtype = getattr(torch, args.weight_dtype)
    os.makedirs(args.out, exist_ok=True)
    result = train(objective, objective_loss, data, config,
                   save=save_fn(args.kind, target, None if dtype == torch.float32 else dtype))
    if args.draft_vocab is not None and int(os.environ.get("RANK", "0")) == 0:
        write_draft_vocab(args.data, args.out, args.draft_vocab, target.config.vocab_size)
    last = result.history[-1] if result.history else {}
    summary = {"kind": args.kind, "step": result.step, "max_steps": args.steps, "train_loss": result.train_loss,
               "eval_loss": result.eval_loss, "parameters": sum(p.numel() for p in drafter.parameters()),
               "interrupted": result.interrupted,
               **{k: v for k, v in last.items() if k.startswith("acc")}}
    return summary


def _tokenizer_size(path: str) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path).get_vocab_size()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary = run(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
