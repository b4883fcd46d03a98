"""The pre-training recipe, assembled from timm's factories by name (nothing re-implemented):
model, optimizer, warm-up + cosine schedule, Mixup/CutMix with soft-target loss, and the backbone
export that `timm.create_model(arch, num_classes=0)` loads."""

from __future__ import annotations

import copy
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch import nn

from core.settings.pretrain import PretrainConfig
from trainers.weights import create_model, unwrap_model


def build_model(config: PretrainConfig, num_classes: int) -> nn.Module:
    """`timm.create_model(arch, num_classes=num_classes, **model_kwargs)`, randomly initialised."""
    return create_model(config.arch, "pretrain.arch", pretrained=False, num_classes=num_classes, **config.model_kwargs)


def backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of `model` (possibly DDP-wrapped) without its classifier, with exactly the keys
    of `timm.create_model(arch, num_classes=0)`: timm's own `reset_classifier(0)` on a copy, so
    whatever the architecture keeps in its head (ConvNeXt's norm, ...) stays as timm keeps it."""
    module = copy.deepcopy(unwrap_model(model)).to("cpu")
    module.reset_classifier(0)
    return {key: value.detach().contiguous() for key, value in module.state_dict().items()}


def build_optimizer(model: nn.Module, config: PretrainConfig) -> torch.optim.Optimizer:
    """timm's `create_optimizer_v2` (AdamW by default; no weight decay on biases and norms, and on
    whatever the model lists in `no_weight_decay()`, as timm does it)."""
    return create_optimizer_v2(unwrap_model(model), opt=config.optimizer, lr=config.lr,
                               weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: PretrainConfig) -> Scheduler:
    """timm's scheduler stepped per epoch: `warmup_epochs` of linear warm-up from `warmup_lr` to
    `lr`, then `scheduler` (cosine) from `lr` down to `min_lr` over the remaining epochs.

    `warmup_prefix=True` puts the decay after the warm-up (without it timm's cosine would already
    be decaying during the warm-up and jump at its end). Call `scheduler.step(epoch)` at the
    start of each epoch.
    """
    scheduler, total = create_scheduler_v2(
        optimizer,
        sched=config.scheduler,
        num_epochs=config.epochs - config.warmup_epochs,
        warmup_epochs=config.warmup_epochs,
        warmup_lr=config.warmup_lr,
        warmup_prefix=True,
        min_lr=config.min_lr,
        step_on_epochs=True,
    )
    if scheduler is None or total != config.epochs:
        raise ValueError(f"pretrain.scheduler {config.scheduler!r} does not give a {config.epochs}-epoch schedule")
    return scheduler


def scheduler_matches(scheduler: Scheduler, saved: dict[str, Any]) -> bool:
    """Whether a saved scheduler state describes the same schedule as `scheduler` (a rerun that
    asks for more epochs changes the schedule; then the new config's one is used)."""
    current = scheduler.state_dict()
    return type(scheduler).__name__ == saved.get("__class__") and all(
        saved.get(key) == value for key, value in current.items()
    )


def scheduler_state(scheduler: Scheduler) -> dict[str, Any]:
    """The scheduler's state (plain values only: loadable with `torch.load(weights_only=True)`)."""
    return {"__class__": type(scheduler).__name__, **scheduler.state_dict()}


def build_loss(config: PretrainConfig) -> nn.Module:
    """Soft-target cross-entropy when Mixup/CutMix mix the labels (they also apply the label
    smoothing), else cross-entropy with label smoothing."""
    if config.mixup_enabled:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)


class BatchAugment:
    """Per-batch augmentation on the training device: uint8 -> normalised float (channels_last on
    GPU), Random Erasing, then Mixup/CutMix, which also turn the labels into soft targets
    (label-smoothed); without Mixup/CutMix the labels pass through unchanged."""

    def __init__(self, config: PretrainConfig, num_classes: int, device: torch.device,
                 channels_last: bool | None = None) -> None:
        self.device = device
        self.channels_last = device.type == "cuda" if channels_last is None else channels_last
        self.mean = torch.tensor([255 * m for m in IMAGENET_DEFAULT_MEAN], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([255 * s for s in IMAGENET_DEFAULT_STD], device=device).view(1, 3, 1, 1)
        self.erasing = (
            RandomErasing(config.random_erasing, mode=config.random_erasing_mode, device=str(device))
            if config.random_erasing > 0 else None
        )
        self.mixup = (
            Mixup(
                mixup_alpha=config.mixup_alpha,
                cutmix_alpha=config.cutmix_alpha,
                prob=config.mixup_prob,
                switch_prob=config.mixup_switch_prob,
                label_smoothing=config.label_smoothing,
                num_classes=num_classes,
            )
            if config.mixup_enabled else None
        )

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        images = images.float().sub_(self.mean).div_(self.std)
        if self.erasing is not None:
            images = self.erasing(images)
        if self.mixup is not None:
            return self.mixup(images, labels)
        return images, labels
