"""BoT's optimisation: Adam with weight decay on every parameter, linear warm-up to the base lr,
then step decay at the milestones. Both schedulers step once per epoch."""

from __future__ import annotations

import warnings

import torch
from timm.optim import create_optimizer_v2
from torch import nn
from torch.optim.lr_scheduler import LinearLR, LRScheduler, MultiStepLR, SequentialLR

from trainers.config import ReidTrainConfig


def build_optimizer(model: nn.Module, config: ReidTrainConfig) -> torch.optim.Optimizer:
    """Adam, lr `base_lr`, L2 weight decay on all parameters (BoT decays biases and norms too,
    hence no timm bias/norm filtering)."""
    return create_optimizer_v2(
        model, opt="adam", lr=config.base_lr, weight_decay=config.weight_decay, filter_bias_and_bn=False
    )


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: ReidTrainConfig) -> LRScheduler:
    """Epoch-wise schedule: lr goes linearly from `warmup_factor * base_lr` (epoch 0) to `base_lr`
    (epoch `warmup_epochs`), then is multiplied by `gamma` at each epoch in `milestones`
    (absolute epochs, counted from the start of training as in BoT's config)."""
    too_early = [m for m in config.milestones if m < config.warmup_epochs]
    if too_early:
        raise ValueError(
            f"milestones {list(config.milestones)}: {too_early} fall inside the warm-up "
            f"(warmup_epochs={config.warmup_epochs})"
        )
    if config.warmup_epochs == 0:
        return MultiStepLR(optimizer, milestones=list(config.milestones), gamma=config.gamma)
    warmup = LinearLR(
        optimizer, start_factor=config.warmup_factor, end_factor=1.0, total_iters=config.warmup_epochs
    )
    # SequentialLR restarts the second scheduler's epoch count at the switch: shift milestones.
    decay = MultiStepLR(
        optimizer, milestones=[m - config.warmup_epochs for m in config.milestones], gamma=config.gamma
    )
    return SequentialLR(optimizer, schedulers=[warmup, decay], milestones=[config.warmup_epochs])


def resumed_lr_scheduler(optimizer: torch.optim.Optimizer, config: ReidTrainConfig, epochs_done: int) -> LRScheduler:
    """`build_lr_scheduler` moved on by `epochs_done` epochs: where a resumed run left off (the
    torch schedulers restore no position from an optimizer's state alone)."""
    scheduler = build_lr_scheduler(optimizer, config)
    with warnings.catch_warnings():  # stepping the schedule without optimizer steps is intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(epochs_done):
            scheduler.step()
    return scheduler
