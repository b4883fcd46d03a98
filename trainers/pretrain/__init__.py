"""Backbone pre-training on the factory's shards (Diffusion-ReID Sec. 4.1) under Ray Train.

Typical use::

    config = load_run_config("configs/paper.yaml").pretrain
    result = pretrain("outputs/diff-person", "checkpoints/diff-person", config)
    result.backbone_path          # loads into timm.create_model(config.arch, num_classes=0)

The config module is imported eagerly (`core.settings.run` composes it and must stay light);
everything that imports torch, timm or Ray is loaded on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from core.settings.pretrain import BatchPlan, FaultInjection, PretrainConfig, plan_batches

# The driver's API (the rest is imported from its submodule: `trainers.pretrain.shards`, ...).
_LAZY = {"PretrainResult": "trainers.pretrain.train", "pretrain": "trainers.pretrain.train"}

__all__ = ["BatchPlan", "FaultInjection", "PretrainConfig", "plan_batches", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
