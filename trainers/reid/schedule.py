"""BoT's optimisation: Adam with weight decay on every parameter, linear warm-up to the base lr,
then step decay at the milestones, stepped once per epoch."""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch import nn

from core.settings.reid import ReidTrainConfig


def build_optimizer(model: nn.Module, config: ReidTrainConfig) -> torch.optim.Optimizer:
    """Adam, lr `base_lr`, L2 weight decay on all parameters (BoT decays biases and norms too,
    hence no timm bias/norm filtering)."""
    return create_optimizer_v2(
        model, opt="adam", lr=config.base_lr, weight_decay=config.weight_decay, filter_bias_and_bn=False
    )


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: ReidTrainConfig, epochs_done: int = 0) -> Scheduler:
    """timm's multistep schedule, stepped by epoch: lr goes linearly from `warmup_factor *
    base_lr` (epoch 0) to `base_lr` (epoch `warmup_epochs`), then is multiplied by `gamma` at each
    epoch in `milestones` (absolute epochs, counted from the start of training as in BoT's config).

    The schedule is a function of the epoch, so a run resumed after `epochs_done` epochs starts
    where it left off; call `scheduler.step(epoch + 1)` after each epoch."""
    too_early = [m for m in config.milestones if m < config.warmup_epochs]
    if too_early:
        raise ValueError(
            f"milestones {list(config.milestones)}: {too_early} fall inside the warm-up "
            f"(warmup_epochs={config.warmup_epochs})"
        )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="multistep",
        num_epochs=config.epochs,
        # timm applies milestone m at epoch m - 1 (its documented convention); BoT's lr changes at m.
        decay_milestones=[m + 1 for m in config.milestones],
        decay_rate=config.gamma,
        warmup_epochs=config.warmup_epochs,
        warmup_lr=config.warmup_factor * config.base_lr,
        warmup_prefix=False,  # milestones count from the first epoch, warm-up included
    )
    scheduler.step(epochs_done)
    return scheduler
