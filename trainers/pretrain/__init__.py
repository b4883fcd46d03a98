"""Backbone pre-training on the factory's shards (Diffusion-ReID Sec. 4.1) under Ray Train.

Typical use::

    config = load_run_config("configs/paper.yaml").pretrain
    result = pretrain("outputs/diff-person", "checkpoints/diff-person", config)
    result.backbone_path          # loads into timm.create_model(config.arch, num_classes=0)

The config module is imported eagerly (`factory.run_config` composes it and must stay light);
everything that imports torch, timm or Ray is loaded on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from trainers.pretrain.config import BatchPlan, FaultInjection, PretrainConfig, plan_batches

_LAZY = {
    "PretrainResult": "trainers.pretrain.train",
    "ResumeMismatchError": "trainers.pretrain.train",
    "find_latest_checkpoint": "trainers.pretrain.train",
    "prepare_run": "trainers.pretrain.train",
    "pretrain": "trainers.pretrain.train",
    "BatchAugment": "trainers.pretrain.data",
    "DecodeAugment": "trainers.pretrain.data",
    "build_train_dataset": "trainers.pretrain.data",
    "build_train_transform": "trainers.pretrain.data",
    "backbone_state_dict": "trainers.pretrain.recipe",
    "build_loss": "trainers.pretrain.recipe",
    "build_model": "trainers.pretrain.recipe",
    "build_optimizer": "trainers.pretrain.recipe",
    "build_scheduler": "trainers.pretrain.recipe",
    "ShardError": "trainers.pretrain.shards",
    "ShardSummary": "trainers.pretrain.shards",
    "inspect_shards": "trainers.pretrain.shards",
    "write_shards": "trainers.pretrain.shards",
    "export_backbone": "trainers.pretrain.export",
    "verify_backbone": "trainers.pretrain.export",
    "write_curves": "trainers.pretrain.plots",
}

__all__ = ["BatchPlan", "FaultInjection", "PretrainConfig", "plan_batches", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
