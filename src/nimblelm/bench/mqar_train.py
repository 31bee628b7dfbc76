"""The MQAR model and one training run (one mixer, one size, one learning rate).

The model is Zoology's: 2 layers with no MLP, layer 0 a gated short convolution (our
``short_conv``: out_proj(conv(x) * in_proj(x)), Zoology's BaseConv plus an output
projection), layer 1 the mixer under test, tied embeddings, built from nimblelm's own
:class:`~nimblelm.LanguageModel` (``mixer_pattern=["short_conv", mixer]``, ``ffn_pattern=["none"]``).
Logits are computed only at labelled positions (hidden [M, D] @ head [D, V]), so a
vocabulary of 8192 costs M x D x V per batch, not B x T x D x V.

Training: AdamW (weight decay 0.1), cosine decay to 0, evaluation on held-out examples every
``eval_every`` steps, early stop once test accuracy reaches ``target_accuracy`` (0.99), and a
wall-clock budget: after a few steps the cosine horizon is shortened to the steps that fit.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from ..models.config import ModelConfig
from ..models.lm import LanguageModel
from ..ops.losses import linear_cross_entropy
from .mqar_data import IGNORE, MQARBatch, multiquery_ar
from .probe_train import Deadline, HorizonFit, make_optimizer


@dataclass
class MQARSetting:
    """One cell of the sweep: mixer under test, width, and the task size."""

    mixer: str
    d_model: int
    seq_len: int
    num_kv_pairs: int


@dataclass
class TrainOptions:
    vocab_size: int = 8192
    num_train: int = 20_000
    num_test: int = 1_000
    batch_size: int = 64
    max_steps: int = 3_000
    time_limit_s: float | None = 120.0
    weight_decay: float = 0.1
    warmup_steps: int = 0
    eval_every: int = 100
    target_accuracy: float = 0.99
    num_heads: int = 2
    window: int = 16  # local_attention window
    seed: int = 0
    extra: dict = field(default_factory=dict)


def mqar_config(setting: MQARSetting, opts: TrainOptions) -> ModelConfig:
    """The 2-layer Zoology model as a ModelConfig (layer 0 short conv, layer 1 the mixer, no FFN)."""
    return ModelConfig(vocab_size=opts.vocab_size, hidden_size=setting.d_model, num_layers=2,
                       num_heads=opts.num_heads, mixer_pattern=["short_conv", setting.mixer], ffn_pattern=["none"],
                       max_seq_len=setting.seq_len, sliding_window=opts.window,
                       chunk_size=min(64, setting.seq_len), tie_embeddings=True,
                       extra={"mamba_head_dim": min(64, 2 * setting.d_model), **opts.extra})


def labelled_hidden(model: LanguageModel, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """inputs/labels [B, T] -> (final hidden states [M, D], targets [M]) at the M labelled positions."""
    hidden = model(inputs, logits_to_keep=1).hidden  # [B, T, D]; the head runs on 1 position only
    mask = labels != IGNORE
    return hidden[mask], labels[mask]


def labelled_logits(model: LanguageModel, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """inputs/labels [B, T] -> (logits [M, V], targets [M]) at the M labelled positions only."""
    hidden, targets = labelled_hidden(model, inputs, labels)
    return hidden @ model.head_weight.t(), targets


def labelled_loss(model: LanguageModel, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy at the labelled positions, without the [M, V] logits
    (:func:`~nimblelm.ops.losses.linear_cross_entropy`; equal to cross-entropy of `labelled_logits`)."""
    hidden, targets = labelled_hidden(model, inputs, labels)
    return linear_cross_entropy(hidden, model.head_weight, targets)


@torch.no_grad()
def evaluate(model: LanguageModel, data: MQARBatch, batch_size: int = 64) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over every labelled position of ``data``."""
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for start in range(0, data.inputs.shape[0], batch_size):
        hidden, targets = labelled_hidden(model, data.inputs[start:start + batch_size],
                                          data.labels[start:start + batch_size])
        # the head a cache-sized block of rows at a time (no [M, V] logits)
        loss, argmax = linear_cross_entropy(hidden, model.head_weight, targets, return_argmax=True)
        correct += int((argmax == targets).sum())
        loss_sum += float(loss) * targets.numel()
        total += targets.numel()
    model.train()
    return correct / total, loss_sum / total


def make_data(setting: MQARSetting, opts: TrainOptions) -> tuple[MQARBatch, MQARBatch]:
    """(train, test) sets from disjoint seeds of the generator."""
    args = dict(vocab_size=opts.vocab_size, seq_len=setting.seq_len, num_kv_pairs=setting.num_kv_pairs)
    train = multiquery_ar(opts.num_train, seed=2 * opts.seed, **args)
    test = multiquery_ar(opts.num_test, seed=2 * opts.seed + 1, **args)
    return train, test


def train_one(setting: MQARSetting, lr: float, opts: TrainOptions,
              data: tuple[MQARBatch, MQARBatch] | None = None, progress=None) -> dict:
    """Train a fresh model at learning rate ``lr``; returns a JSON-able record with the test
    accuracy (best evaluation), steps, seconds and why it stopped."""
    train, test = data if data is not None else make_data(setting, opts)
    torch.manual_seed(opts.seed)
    model = LanguageModel(mqar_config(setting, opts))
    optimizer, scheduler, schedule = make_optimizer(model, lr, opts.weight_decay, opts.max_steps, opts.warmup_steps)
    generator = torch.Generator().manual_seed(opts.seed)
    deadline = Deadline(opts.time_limit_s)
    horizon = HorizonFit(deadline)
    best_acc, last_loss, step, stop, curve = 0.0, float("nan"), 0, "max_steps", []
    order = torch.randperm(train.inputs.shape[0], generator=generator)
    cursor = 0
    while step < schedule.total_steps:
        if cursor + opts.batch_size > order.numel():
            order, cursor = torch.randperm(train.inputs.shape[0], generator=generator), 0
        idx = order[cursor:cursor + opts.batch_size]
        cursor += opts.batch_size
        loss = labelled_loss(model, train.inputs[idx], train.labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step, last_loss = step + 1, float(loss.detach())
        horizon.update(step, schedule, opts.max_steps)  # fit the cosine horizon into the budget
        if step % opts.eval_every == 0 or step >= schedule.total_steps:
            acc, test_loss = evaluate(model, test)
            best_acc = max(best_acc, acc)
            curve.append((step, round(acc, 4), round(test_loss, 4)))
            if progress is not None:
                progress.set_postfix_str(f"{setting.mixer} d={setting.d_model} lr={lr:g} acc={acc:.3f}")
            if acc >= opts.target_accuracy:
                stop = "target"
                break
        if deadline.expired():
            stop = "time"
            break
    if stop == "max_steps" and step < opts.max_steps:
        stop = "time"  # the horizon fit shortened the schedule to the time budget
    return dict(**asdict(setting), lr=lr, accuracy=best_acc, train_loss=last_loss, steps=step,
                seconds=round(deadline.elapsed(), 2), stop=stop, max_steps=opts.max_steps, curve=curve,
                params=model.num_parameters(), state_bytes=mixer_state_bytes(model, setting.seq_len))


def mixer_state_bytes(model: LanguageModel, context: int) -> int:
    """Bytes of decoding state of layer 1 (the mixer under test) for ONE sequence after
    ``context`` tokens, in the model's dtype: the fixed recurrent state, or the KV cache of
    ``context`` tokens for attention (of min(window, context) for sliding-window attention)."""
    state = model.blocks[1].mixer.init_state(1, context, model.embed.weight.device, model.embed.weight.dtype)
    nbytes = state.nbytes()
    window = getattr(model.blocks[1].mixer, "window", None)
    if window is not None and window < context:
        nbytes = nbytes * window // context
    return int(nbytes)


@torch.no_grad()
def decode_throughput(setting: MQARSetting, opts: TrainOptions, steps: int = 32) -> float:
    """Tokens per second of batch-1 one-token decoding after a prefill of ``seq_len`` tokens
    (fresh weights: speed does not depend on them), full 2-layer model with its LM head."""
    torch.manual_seed(opts.seed)
    model = LanguageModel(mqar_config(setting, opts)).eval()
    model.config.max_seq_len = setting.seq_len + steps
    cache = model.make_cache(1, setting.seq_len + steps)
    tokens = torch.randint(opts.vocab_size, (1, setting.seq_len + steps))
    model(tokens[:, :setting.seq_len], cache=cache, logits_to_keep=1)
    model(tokens[:, setting.seq_len:setting.seq_len + 1], cache=cache)  # warm-up step
    start = time.perf_counter()
    for i in range(setting.seq_len + 1, setting.seq_len + steps):
        model(tokens[:, i:i + 1], cache=cache)
    return (steps - 1) / (time.perf_counter() - start)
