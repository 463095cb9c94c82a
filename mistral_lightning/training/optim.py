"""AdamW without weight decay on norms, and the learning-rate schedule: linear warmup, then cosine or constant."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from mistral_lightning.errors import UserError

LRSchedule = Literal["cosine", "constant"]


@dataclass(frozen=True)
class OptimizerConfig:
    """`model.optimizer`: AdamW's settings; `lr` is the peak the schedule warms up to."""

    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8


@dataclass(frozen=True)
class ScheduleConfig:
    """`model.schedule`: linear warmup over `warmup_fraction` of the run's optimizer steps, then
    `kind` "cosine" (down to `min_lr` at the last step) or "constant"."""

    kind: LRSchedule = "cosine"
    warmup_fraction: float = 0.01
    min_lr: float = 3e-5


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (a LoRA run's adapters only) in two groups: matrices decay, norm
    weights (the only 1-D parameters) do not; a group left empty is dropped.

    The split also keeps each group on one device mesh (TP-sharded matrices vs. replicated norms),
    which the optimizer's fused per-group updates need.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [
        {"params": params, "weight_decay": weight_decay}
        for params, weight_decay in ((decay, config.weight_decay), (no_decay, 0.0))
        if params
    ]
    # fused: one kernel per group instead of a Python loop of small ops per (DTensor) parameter.
    # tuple(): betas read back from a checkpoint's hyper-parameters may be a list.
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, fused=True)


def lr_factor(
    step: int, *, warmup_steps: int, total_steps: int, min_ratio: float, schedule: LRSchedule
) -> float:
    """Multiplier of the peak learning rate before optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: ScheduleConfig, *, lr: float, total_steps: int
) -> LambdaLR:
    """The schedule as a multiplier of the peak `lr` over `total_steps` optimizer steps."""
    if config.kind not in ("cosine", "constant"):
        raise UserError(f"model.schedule.kind={config.kind!r} is not one of 'cosine', 'constant'")
    if not 0.0 <= config.warmup_fraction < 1.0:
        raise UserError(f"model.schedule.warmup_fraction={config.warmup_fraction} must be in [0, 1)")
    if not 0.0 <= config.min_lr <= lr:
        raise UserError(
            f"model.schedule.min_lr={config.min_lr} must be between 0 and model.optimizer.lr={lr}"
        )
    if total_steps <= 0:
        raise UserError(
            "the LR schedule needs a finite number of steps; set trainer.max_steps (or trainer.max_epochs)"
        )
    warmup_steps = round(config.warmup_fraction * total_steps)

    def factor(step: int) -> float:
        return lr_factor(
            step,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            min_ratio=config.min_lr / lr if lr else 0.0,
            schedule=config.kind,
        )

    return LambdaLR(optimizer, factor)
