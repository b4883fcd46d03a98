"""The product of pre-training: `CKPT_DIR/backbone.safetensors`, checked against timm before it
is handed out, with `backbone.json` saying how to build the model it belongs to.

    model = timm.create_model(arch, num_classes=0, **model_kwargs)
    model.load_state_dict(safetensors.torch.load_file("backbone.safetensors"))   # strict

The Re-ID trainer takes the same file as `init: CKPT_DIR/backbone.safetensors`.
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
from torch import nn

from core.settings.pretrain import PretrainConfig
from trainers.weights import load_backbone_safetensors, save_state_safetensors

BACKBONE_INFO_FILE = "backbone.json"


def verify_backbone(path: str | Path, config: PretrainConfig) -> nn.Module:
    """`timm.create_model(arch, num_classes=0, **model_kwargs)` with the weights of `path` loaded;
    `trainers.weights.WeightsMismatchError` (naming the keys) on any missing or unexpected key."""
    return load_backbone_safetensors(timm.create_model(config.arch, num_classes=0, **config.model_kwargs), path)


def export_backbone(source: str | Path, destination: str | Path, config: PretrainConfig,
                    num_classes: int | None = None) -> Path:
    """Copy a checkpoint's backbone weights to `destination` (atomically), verified against timm,
    and write `backbone.json` (arch, model_kwargs, pre-training classes) beside it."""
    source, destination = Path(source), Path(destination)
    save_state_safetensors(verify_backbone(source, config), destination)
    info = {
        "arch": config.arch,
        "model_kwargs": config.model_kwargs,
        "image_size": list(config.image_size),
        "pretrain_classes": num_classes,
        "load": f"timm.create_model({config.arch!r}, num_classes=0, **model_kwargs)",
    }
    (destination.parent / BACKBONE_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return destination
