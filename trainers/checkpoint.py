"""The one training-checkpoint format of the project's three trainers (the Re-ID trainer, the
downstream trials, the backbone pre-training). A checkpoint is a folder:

    model.safetensors    the model's weights (safetensors: data, never code)
    optimizer.pt         the optimizer's state (read back with `weights_only=True`)
    state.json           {"epoch": epochs done, "history": [metrics per epoch], ...}, written last
and, where a trainer has them: `loss.safetensors` (a loss with parameters, e.g. AGW's centres),
`scheduler.pt` (a schedule whose position is not just the epoch), `rng_rank<k>.pt` (each rank's
RNG states) and `backbone.safetensors` (timm `num_classes=0` keys, for the user).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

MODEL_FILE = "model.safetensors"
BACKBONE_FILE = "backbone.safetensors"
LOSS_FILE = "loss.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
STATE_FILE = "state.json"
RNG_FILE = "rng_rank{rank}.pt"
CONFIG_FILE = "config.yaml"


@dataclass
class TrainingState:
    """What a checkpoint restores."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    epoch: int
    history: list[dict[str, float]]
    loss: dict[str, torch.Tensor] | None = None
    scheduler: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more keys of state.json (what a trainer needs)


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies of a module's state (safetensors takes nothing else)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def _load_torch(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)  # a checkpoint is data, never code


def save_training_state(directory: str | Path, state: TrainingState) -> None:
    """Write `state` into `directory`; `state.json` last, so a folder that has it is complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.model.items()}, str(directory / MODEL_FILE))
    if state.loss is not None:
        save_file({k: v.contiguous() for k, v in state.loss.items()}, str(directory / LOSS_FILE))
    torch.save(state.optimizer, directory / OPTIMIZER_FILE)
    if state.scheduler is not None:
        torch.save(state.scheduler, directory / SCHEDULER_FILE)
    meta = {**state.extra, "epoch": state.epoch, "history": state.history}
    (directory / STATE_FILE).write_text(json.dumps(meta, indent=2))


def load_training_state(directory: str | Path) -> TrainingState:
    directory = Path(directory)
    meta = json.loads((directory / STATE_FILE).read_text())
    loss, scheduler = directory / LOSS_FILE, directory / SCHEDULER_FILE
    return TrainingState(
        model=load_file(str(directory / MODEL_FILE)),
        optimizer=_load_torch(directory / OPTIMIZER_FILE),
        epoch=int(meta.pop("epoch")),
        history=list(meta.pop("history")),
        loss=load_file(str(loss)) if loss.is_file() else None,
        scheduler=_load_torch(scheduler) if scheduler.is_file() else None,
        extra=meta,
    )


def load_rng_state(directory: str | Path, rank: int) -> Any | None:
    path = Path(directory) / RNG_FILE.format(rank=rank)
    return _load_torch(path) if path.is_file() else None
