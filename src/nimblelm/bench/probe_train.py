"""What the learning probes (MQAR, Markov) share: the optimiser, the schedule, a time budget."""

from __future__ import annotations

import json
import math
import os
import time

import torch


class CosineSchedule:
    """lr factor: linear warm-up over ``warmup_steps``, then cosine from 1 to 0 at
    ``total_steps`` (0 after it). ``total_steps`` may be lowered during a run (a time budget)."""

    def __init__(self, total_steps: int, warmup_steps: int = 0):
        self.total_steps, self.warmup_steps = total_steps, warmup_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, total_steps: int,
                   warmup_steps: int = 0) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR,
                                                   CosineSchedule]:
    """AdamW on every parameter (decoupled weight decay ``weight_decay``, as Zoology) under a
    :class:`CosineSchedule`. Returns (optimizer, scheduler, schedule)."""
    if lr <= 0 or total_steps < 1:
        raise ValueError(f"learning rate must be positive and steps >= 1, got lr={lr}, steps={total_steps}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    schedule = CosineSchedule(total_steps, warmup_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), schedule


class Deadline:
    """Wall-clock budget of one run: ``expired()`` once ``seconds`` have passed (None = never)."""

    def __init__(self, seconds: float | None):
        self.start = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def expired(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds


class HorizonFit:
    """Fits a cosine schedule's horizon to a wall-clock budget as a run goes.

    ``update(step, schedule, max_steps)`` after every optimizer step: at steps 10, 20, 40, 80,
    ... it sets ``schedule.total_steps`` to the steps that fit in ``seconds``, timing from
    step 2 on (the first steps carry one-off costs that made an early estimate end runs at a
    fraction of their budget). Never below ``step + 1``, never above ``max_steps``."""

    def __init__(self, deadline: Deadline):
        self.deadline = deadline
        self.since: tuple[int, float] | None = None  # (step, elapsed) where timing starts
        self.next_fit = 10

    def update(self, step: int, schedule, max_steps: int) -> None:
        if self.deadline.seconds is None:
            return
        if step == 2:
            self.since = (step, self.deadline.elapsed())
        if step < self.next_fit or self.since is None:
            return
        self.next_fit *= 2
        start_step, start_time = self.since
        per_step = (self.deadline.elapsed() - start_time) / (step - start_step)
        fitting = start_step + int((self.deadline.seconds - start_time) / max(per_step, 1e-9))
        schedule.total_steps = max(step + 1, min(max_steps, fitting))


def write_json_atomic(path: str, data: dict) -> None:
    """Write ``data`` to ``path`` via a temporary file, so a killed sweep never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)
