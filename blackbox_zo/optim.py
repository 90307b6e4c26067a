"""The optimizer and learning-rate schedule a run's settings name (`optimizer.*`, `schedule.*`).

The trainer writes each zeroth-order estimate into `p.grad`; what steps is a plain
`torch.optim` optimizer, so anything torch.optim offers works on the same estimates.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .config import AdamConfig, CosineSchedule, OptimizerConfig, ScheduleConfig, SGDConfig, StepSchedule

__all__ = ["build_optimizer", "build_scheduler"]


def build_optimizer(cfg: OptimizerConfig, params: Sequence[Tensor]) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam or AdamW from the `optimizer` section."""
    if isinstance(cfg, SGDConfig):
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    if isinstance(cfg, AdamConfig):
        kind = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        return kind(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer.name={cfg.name!r} has no optimizer")


def build_scheduler(cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, total_steps: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR: linear warm-up from lr/10, then constant / cosine / step decay."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    total = max(1, total_steps)

    def after_warmup(step: int) -> float:
        if isinstance(cfg, StepSchedule):
            return cfg.gamma ** ((step // max(1, steps_per_epoch)) // cfg.step_every_epochs)
        if isinstance(cfg, CosineSchedule):
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0  # constant

    def factor(step: int) -> float:
        if step < warmup:
            return 0.1 + 0.9 * step / max(1, warmup)
        return after_warmup(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
