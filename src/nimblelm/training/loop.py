"""The training loop shared by ``nimblelm train lm`` and ``nimblelm train drafter``.

AdamW (decoupled weight decay on matrices only), linear warmup then cosine decay to
``min_lr``, gradient-norm clipping, periodic validation loss, and checkpoints that resume
EXACTLY: the checkpoint holds the weights, the optimizer moments, the step and the RNG
state, and batches are a pure function of the step (:class:`TokenData`), so ``N`` steps in one
run and ``k`` + ``N - k`` steps across a resume give identical weights.

Runs as one process, or under ``torchrun --nproc_per_node=N`` with no code change: the
module is wrapped in DistributedDataParallel (gloo on CPU, nccl on CUDA), every rank draws
its own batch, gradients are averaged, rank 0 writes checkpoints, logs and the final save.
The effective batch is ``batch_size * world_size`` sequences per step.

Checkpoints are safetensors + JSON (nothing is unpickled on resume).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from ..errors import NimbleError
from .data import TokenData

LossFn = Callable[[torch.nn.Module, torch.Tensor], "tuple[torch.Tensor, dict[str, float]]"]
CHECKPOINT_DIR = "checkpoint"


@dataclass
class TrainConfig:
    out_dir: str
    max_steps: int
    batch_size: int = 16          # sequences per step per process
    seq_len: int = 256
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 200         # 0 = only at the end
    eval_batches: int = 16
    checkpoint_every: int = 200   # 0 = only at the end (and on interrupt)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise NimbleError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr or self.min_lr < 0:
            raise NimbleError(f"lr must be > 0 and min_lr >= 0, got {self.lr}, {self.min_lr}")


@dataclass
class TrainResult:
    step: int
    train_loss: float
    eval_loss: float | None
    history: list[dict] = field(default_factory=list)
    interrupted: bool = False
    ranks_in_sync: bool | None = None   # None in a single process


def add_loop_arguments(parser, batch_size: int, lr: float, min_lr: float, warmup: int, weight_decay: float,
                       eval_batches: int) -> None:
    """The command-line options of the shared loop (``train lm`` and ``train drafter``), with
    each command's own defaults; :func:`config_from_args` turns them into a TrainConfig."""
    parser.add_argument("--batch-size", type=int, default=batch_size, help="sequences per step per process")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--min-lr", type=float, default=min_lr)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--weight-decay", type=float, default=weight_decay)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-batches", type=int, default=eval_batches)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads per process")
    parser.add_argument("--weight-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="storage dtype of the final weights (they load as float32)")
    parser.add_argument("--no-progress", action="store_true")


def config_from_args(args, max_steps: int, min_lr: float | None = None) -> TrainConfig:
    """A TrainConfig from the options of :func:`add_loop_arguments` (``out_dir`` = ``args.out``)."""
    return TrainConfig(out_dir=args.out, max_steps=max_steps, batch_size=args.batch_size, seq_len=args.seq_len,
                       lr=args.lr, min_lr=args.min_lr if min_lr is None else min_lr, warmup_steps=args.warmup,
                       weight_decay=args.weight_decay, grad_clip=args.grad_clip, eval_every=args.eval_every,
                       eval_batches=args.eval_batches, checkpoint_every=args.checkpoint_every, seed=args.seed,
                       progress=not args.no_progress)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` down to ``min_lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def distributed_setup() -> tuple[int, int]:
    """(rank, world) — initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def make_optimizer(module: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise NimbleError("the module has no trainable parameters")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=1e-8)


def train(module: torch.nn.Module, loss_fn: LossFn, data: TokenData, config: TrainConfig,
          save: Callable[[torch.nn.Module, str], None] | None = None) -> TrainResult:
    """Train ``module``'s trainable parameters on ``loss_fn(module, batch)``; resume from
    ``config.out_dir/checkpoint`` when it exists. ``save(module, out_dir)`` writes the final
    artefact (rank 0). Ctrl-C / SIGTERM writes a checkpoint and returns ``interrupted=True``."""
    rank, world = distributed_setup()
    optimizer = make_optimizer(module, config)
    step = _resume(module, optimizer, config)
    wrapped = torch.nn.parallel.DistributedDataParallel(module) if world > 1 else module
    history: list[dict] = _read_history(config) if step else []
    stop = _StopFlag()
    bar = _progress_bar(config, step, rank)
    train_loss, eval_loss, tokens_seen, started = float("nan"), None, 0, time.perf_counter()
    module.train()
    while step < config.max_steps and not stop.requested:
        lr = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = data.train_batch(step, rank, world, config.batch_size, config.seq_len)
        loss, metrics = loss_fn(wrapped, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), config.grad_clip)
        optimizer.step()
        step += 1
        train_loss = _mean_over_ranks(float(loss.detach()), world)
        tokens_seen += batch[:, :-1].numel() * world
        rate = tokens_seen / (time.perf_counter() - started)
        record = {"step": step, "loss": train_loss, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": rate,
                  **metrics}
        if (config.eval_every and step % config.eval_every == 0) or step == config.max_steps:
            eval_loss = evaluate(module, loss_fn, data, config, rank, world)
            record["eval_loss"] = eval_loss
            module.train()
        history.append(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{rate:,.0f}",
                            **({"eval": f"{eval_loss:.3f}"} if eval_loss is not None else {}))
        if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == config.max_steps:
            _checkpoint(module, optimizer, step, history, config, rank, world)
    if stop.requested and step < config.max_steps:
        _checkpoint(module, optimizer, step, history, config, rank, world)
    stop.restore()
    if bar is not None:
        bar.close()
    if save is not None and rank == 0 and step >= config.max_steps:
        save(module, config.out_dir)
    in_sync = None
    if world > 1:
        in_sync = weights_agree_across_ranks(module)
        dist.barrier()
    return TrainResult(step, train_loss, eval_loss, history, interrupted=step < config.max_steps, ranks_in_sync=in_sync)


@torch.no_grad()
def weights_agree_across_ranks(module: torch.nn.Module) -> bool:
    """True when every rank holds bit-identical parameters (compared via float64 sums)."""
    flat = torch.cat([p.detach().double().flatten() for p in module.parameters()])
    mine = torch.stack([flat.sum(), (flat * flat).sum(), (flat * torch.arange(flat.numel(), dtype=torch.float64)).sum()])
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return all(torch.equal(g, gathered[0]) for g in gathered)


@torch.no_grad()
def evaluate(module: torch.nn.Module, loss_fn: LossFn, data: TokenData, config: TrainConfig,
             rank: int = 0, world: int = 1, split: str = "val") -> float:
    """Mean loss over the fixed eval windows (split across ranks, averaged by token count)."""
    module.eval()
    batches = data.eval_batches(config.eval_batches, config.batch_size, config.seq_len, split)
    total = torch.zeros(2, dtype=torch.float64)
    for batch in batches[rank::world]:
        loss, _ = loss_fn(module, batch)
        total += torch.tensor([float(loss) * batch.shape[0], batch.shape[0]], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(total)
    return float(total[0] / total[1].clamp(min=1))


def _mean_over_ranks(value: float, world: int) -> float:
    if world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor) / world


def _progress_bar(config: TrainConfig, step: int, rank: int):
    if rank != 0 or not config.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=config.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)


class _StopFlag:
    """Turns SIGTERM / SIGINT into a graceful stop at the end of the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# -- checkpoints -------------------------------------------------------------------------------
def _checkpoint(module, optimizer, step: int, history: list[dict], config: TrainConfig, rank: int, world: int) -> None:
    if rank == 0:
        write_checkpoint(os.path.join(config.out_dir, CHECKPOINT_DIR), module, optimizer, step, config)
        _write_history(config, history)
    if world > 1:
        dist.barrier()


def write_checkpoint(directory: str, module, optimizer, step: int, config: TrainConfig) -> None:
    """Weights, optimizer moments, step and RNG state; written to a temporary directory and
    swapped in, so an interrupted write leaves the previous checkpoint intact."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in module.state_dict().items()}
    state = optimizer.state_dict()
    for index, slots in state["state"].items():
        for name, value in slots.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"step": step, "param_groups": state["param_groups"], "config": asdict(config)}
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, "state.safetensors"))
    with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1)
    old = directory + ".old"
    if os.path.isdir(directory):
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def _resume(module, optimizer, config: TrainConfig) -> int:
    """Load ``out_dir/checkpoint`` into module and optimizer; returns the step (0 if none)."""
    from safetensors.torch import load_file

    directory = os.path.join(config.out_dir, CHECKPOINT_DIR)
    if not os.path.isfile(os.path.join(directory, "state.json")):
        return 0
    with open(os.path.join(directory, "state.json"), encoding="utf-8") as fh:
        meta = json.load(fh)
    tensors = load_file(os.path.join(directory, "state.safetensors"))
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        module.load_state_dict(model_state)
    except RuntimeError as exc:
        raise NimbleError(f"{directory} was written for a different model ({str(exc).splitlines()[-1].strip()}); "
                          "use a new --out directory or delete the checkpoint") from None
    slots: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"])


def _history_path(config: TrainConfig) -> str:
    return os.path.join(config.out_dir, "train_log.jsonl")


def _write_history(config: TrainConfig, history: list[dict]) -> None:
    path = _history_path(config)
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in history)
    os.replace(path + ".tmp", path)


def _read_history(config: TrainConfig) -> list[dict]:
    path = _history_path(config)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
