"""BoT's optimisation: Adam with weight decay on every parameter, linear warm-up to the base lr,
then step decay at the milestones, stepped once per epoch.

Other methods' recipes choose, through the same config: momentum SGD (MGN), a cosine schedule
held at the base lr until `cosine_delay_epochs` (fast-reid's SBS), and a backbone that gets no
update in the first `freeze_backbone_epochs` (fast-reid's FREEZE_ITERS): the optimiser then holds
the backbone's parameters in a group marked `FROZEN_UNTIL_EPOCH`, which `run_epoch` honours.
"""

from __future__ import annotations

import math

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch import nn

from core.settings.reid import ReidTrainConfig
from trainers.weights import unwrap_model

# Key of an optimiser param group: its parameters get no update before this epoch (0-based).
FROZEN_UNTIL_EPOCH = "frozen_until_epoch"

# Our optimiser names -> timm's: timm's "sgd" is Nesterov SGD; "momentum" is the classic one.
_TIMM_OPTIMIZERS = {"adam": "adam", "sgd": "momentum"}


def build_optimizer(model: nn.Module, config: ReidTrainConfig) -> torch.optim.Optimizer:
    """`config.optimizer` (Adam by default), lr `base_lr`, L2 weight decay on all parameters (BoT
    decays biases and norms too, hence no timm bias/norm filtering). With
    `freeze_backbone_epochs`, the parameters of `model.backbone` form a group of their own marked
    `FROZEN_UNTIL_EPOCH`."""
    params = _backbone_frozen_groups(model, config.freeze_backbone_epochs) if config.freeze_backbone_epochs else model
    return create_optimizer_v2(
        params, opt=_TIMM_OPTIMIZERS[config.optimizer], lr=config.base_lr, weight_decay=config.weight_decay,
        momentum=config.momentum, filter_bias_and_bn=False,
    )


def _backbone_frozen_groups(model: nn.Module, epochs: int) -> list[dict]:
    """[backbone parameters marked frozen for `epochs`, every other parameter]."""
    backbone = getattr(unwrap_model(model), "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"freeze_backbone_epochs needs a model with a `backbone` module; "
                         f"{type(unwrap_model(model)).__name__} has none")
    frozen = {id(p) for p in backbone.parameters()}
    head = [p for p in model.parameters() if id(p) not in frozen]
    return [{"params": list(backbone.parameters()), FROZEN_UNTIL_EPOCH: epochs}, {"params": head}]


def frozen_parameters(optimizer: torch.optim.Optimizer, epoch: int) -> list[nn.Parameter]:
    """The trainable parameters that get no update in `epoch` (0-based): those of the groups
    marked `FROZEN_UNTIL_EPOCH` later than it."""
    return [p for group in optimizer.param_groups if epoch < group.get(FROZEN_UNTIL_EPOCH, 0)
            for p in group["params"] if p.requires_grad]


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: ReidTrainConfig, epochs_done: int = 0) -> Scheduler:
    """`lr_schedule` step: timm's multistep schedule, stepped by epoch: lr goes linearly from
    `warmup_factor * base_lr` (epoch 0) to `base_lr` (epoch `warmup_epochs`), then is multiplied
    by `gamma` at each epoch in `milestones` (absolute epochs, counted from the start of training
    as in BoT's config). `lr_schedule` cosine: `WarmupCosineScheduler`.

    The schedule is a function of the epoch, so a run resumed after `epochs_done` epochs starts
    where it left off; call `scheduler.step(epoch + 1)` after each epoch."""
    if config.lr_schedule == "cosine":
        scheduler: Scheduler = WarmupCosineScheduler(optimizer, config)
        scheduler.step(epochs_done)
        return scheduler
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


class WarmupCosineScheduler(Scheduler):
    """fast-reid's SBS schedule, by epoch `t`: BoT's linear warm-up from `warmup_factor * base_lr`
    over `warmup_epochs`, `base_lr` until `start = max(warmup_epochs, cosine_delay_epochs)`, then
    `min_lr + (base_lr - min_lr) * (1 + cos(pi * (t - start) / (epochs - start))) / 2`, as torch's
    CosineAnnealingLR stepped once per epoch from `start` (timm's cosine scheduler has no hold)."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: ReidTrainConfig) -> None:
        super().__init__(optimizer, param_group_field="lr", t_in_epochs=True)
        self.warmup_epochs, self.warmup_factor = config.warmup_epochs, config.warmup_factor
        self.start = max(config.warmup_epochs, config.cosine_delay_epochs)
        self.length, self.min_lr = config.epochs - self.start, config.min_lr

    def _lr(self, base: float, t: int) -> float:
        if t < self.warmup_epochs:
            warmup_lr = self.warmup_factor * base
            return warmup_lr + t * (base - warmup_lr) / self.warmup_epochs
        if t < self.start:
            return base
        progress = min(t - self.start, self.length) / self.length
        return self.min_lr + 0.5 * (base - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def _get_lr(self, t: int) -> list[float]:
        return [self._lr(base, t) for base in self.base_values]
