"""Training the BoT baseline under Ray Train (`TorchTrainer`, one DDP rank per worker).

`train_reid` is the driver side: it turns the dataset into plain lists, starts (or joins) Ray,
runs `train_loop_per_worker` on `config.num_workers` workers and collects the final weights.
Each epoch rank 0 reports a `trainers.checkpoint` folder (`model.safetensors`: the whole Re-ID
model with BNNeck and classifier; `backbone.safetensors`, `optimizer.pt`, `state.json`), and a
worker that finds a checkpoint (Ray restarting it after a failure, or a rerun into the same output
folder) resumes from it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import ScalingConfig
from torch import nn

from core.storage import local_folder, resolve, user_path
from core.datasets.base import ReidDataset
from trainers.device import Precision, train_worker_device
from trainers.checkpoint import BACKBONE_FILE, MODEL_FILE, STATE_FILE, TrainingState, cpu_state, save_training_state
from core.settings.reid import ReidTrainConfig
from trainers.ray_train import fit, quiet_ray_train_reports, read_checkpoint, report_checkpoint, start_run
from trainers.reid.data import TrainingSet, make_train_loader
from trainers.reid.losses import BotLoss
from trainers.reid.model import ReidOutput, build_reid_model
from trainers.reid.schedule import build_lr_scheduler, build_optimizer, frozen_parameters
from trainers.weights import save_backbone_safetensors, unwrap_model

METRICS_FILE = "metrics.json"

# Worker-side progress goes through logging: Ray Train routes it to the driver once.
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReidTrainResult:
    """Where a finished `train_reid` run put its outputs, and what it measured per epoch."""

    model_path: Path | str  # whole Re-ID model; load with `load_reid_model` (a Path when local, else a URI)
    backbone_path: Path | str  # backbone alone, timm `num_classes=0` keys
    num_classes: int
    history: list[dict[str, float]]  # one entry per epoch (epoch, lr, loss, id_loss, triplet_loss, ...)
    run_dir: Path | str  # Ray Train's run folder with the per-epoch checkpoints


def train_reid(
    dataset: ReidDataset, config: ReidTrainConfig, out_dir: str | Path, run_name: str = "reid_train",
    images: Mapping[str, bytes] | None = None,
    on_start: tuple[Any, str] | None = None,
) -> ReidTrainResult:
    """Train the BoT baseline on `dataset.train` with Ray Train; outputs go under `out_dir` (a
    folder or any URI: Ray Train's `storage_path`).

    `images` (path -> encoded bytes, as the caller read them) travel to the workers with the
    training set, so no worker opens a path that exists only on the driver's machine.
    `on_start` (an actor with a `mark` method, a name): rank 0 calls `mark.remote(name)` once the
    workers hold their resources and the model is built (the factory starts its pipeline then).
    Joins the Ray cluster of `RAY_ADDRESS` or the one already initialised, else starts a local one.
    Writes `out_dir/{model,backbone}.safetensors`, `metrics.json` and the resolved `config.yaml`.
    """
    out = resolve(out_dir)
    training = TrainingSet.from_records(dataset.train, images)
    if training.num_classes < config.ids_per_batch:
        raise ValueError(
            f"{dataset.name}: {training.num_classes} training identities, fewer than "
            f"ids_per_batch={config.ids_per_batch}"
        )
    use_gpu = start_run(out, config)
    cpus = resolve_cpus_per_worker(config)
    loop_config = {"config": config.model_dump(mode="json"), "training": asdict(training),
                   "threads": max(1, int(cpus)), "on_start": on_start}
    scaling = ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus})
    checkpoint = fit(train_loop_per_worker, loop_config, scaling, out, run_name, keep=2, max_failures=1)
    with checkpoint.as_directory() as checkpoint_dir, local_folder(out) as folder:
        shutil.copy2(Path(checkpoint_dir) / MODEL_FILE, folder / MODEL_FILE)
        shutil.copy2(Path(checkpoint_dir) / BACKBONE_FILE, folder / BACKBONE_FILE)
        history = json.loads((Path(checkpoint_dir) / STATE_FILE).read_text())["history"]
        (folder / METRICS_FILE).write_text(json.dumps(history, indent=2))
    return ReidTrainResult(
        model_path=user_path(out / MODEL_FILE),
        backbone_path=user_path(out / BACKBONE_FILE),
        num_classes=training.num_classes,
        history=history,
        run_dir=user_path(out / run_name),
    )


def resolve_cpus_per_worker(config: ReidTrainConfig) -> float:
    """The CPUs a worker reserves: `cpus_per_worker`, or the cluster's CPUs shared evenly among
    the workers, capped at the largest node's (a worker lives on one node)."""
    node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    largest = max(node_cpus, default=0.0)
    if config.cpus_per_worker is not None:
        if config.cpus_per_worker > largest:
            raise ValueError(
                f"cpus_per_worker={config.cpus_per_worker} but the largest Ray node has {largest} CPUs"
            )
        return config.cpus_per_worker
    return max(1.0, min(largest, sum(node_cpus) // config.num_workers))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One DDP rank: build, restore, train `config.epochs` epochs, report every epoch."""
    config = ReidTrainConfig.model_validate(loop_config["config"])
    training = TrainingSet(**loop_config["training"])
    torch.set_num_threads(int(loop_config["threads"]))
    quiet_ray_train_reports()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = train_worker_device()
    precision = Precision.for_device(device)

    torch.manual_seed(config.seed)  # same initial weights everywhere (DDP broadcasts rank 0's anyway)
    model = build_reid_model(config, training.num_classes)
    restored, _ = read_checkpoint(ray.train.get_checkpoint())
    if restored is not None:
        model.load_state_dict(restored.model)
    model = ray.train.torch.prepare_model(model.to(memory_format=precision.memory_format))
    if rank == 0 and loop_config.get("on_start") is not None:
        signal, name = loop_config["on_start"]
        signal.mark.remote(name)
    optimizer = build_optimizer(model, config)
    start_epoch, history = 0, []
    if restored is not None:
        optimizer.load_state_dict(restored.optimizer)
        start_epoch, history = restored.epoch, restored.history
    scheduler = build_lr_scheduler(optimizer, config, start_epoch)

    torch.manual_seed(config.seed + 1000 * rank + start_epoch)  # augmentations differ per rank
    loader = make_train_loader(training, config, rank, world_size, device)
    loss_fn = BotLoss(config.label_smoothing, config.triplet_margin)
    if start_epoch >= config.epochs:  # nothing left to do: hand the restored result back
        _report(model, optimizer, start_epoch, history, rank)
        return
    for epoch in range(start_epoch, config.epochs):
        metrics = run_epoch(epoch, model, loader, loss_fn, optimizer, scheduler, device, precision)
        history.append(metrics)
        if rank == 0:
            logger.info("reid: epoch %d/%d loss %.4f acc %.3f lr %.2e %.1f img/s", epoch + 1, config.epochs,
                        metrics["loss"], metrics["train_accuracy"], metrics["lr"], metrics["images_per_second"])
        _report(model, optimizer, epoch + 1, history, rank)


def run_epoch(epoch: int, model: nn.Module, loader: torch.utils.data.DataLoader, loss_fn: nn.Module,
              optimizer: torch.optim.Optimizer, scheduler: Any, device: torch.device,
              precision: Precision | None = None) -> dict[str, float]:
    """One epoch of the BoT loop shared by the Re-ID trainer and the downstream trials: the
    sampler's epoch, the pass over the data, the schedule's step; returns the epoch's metrics.
    `precision`: pass the same one every epoch (None: `Precision.for_device(device)`, whose fp16
    scaler would start over each epoch); the model must already be in its memory format.
    Parameters the optimiser holds frozen in this epoch (`build_optimizer`'s
    `freeze_backbone_epochs`) stop requiring gradients for it, so they get none and the optimiser
    leaves them and their moments alone (as fast-reid drops their gradients); not for DDP models."""
    loader.batch_sampler.set_epoch(epoch)
    lr = optimizer.param_groups[0]["lr"]
    frozen = frozen_parameters(optimizer, epoch)
    for parameter in frozen:
        parameter.requires_grad_(False)
    try:
        metrics = {"epoch": epoch + 1, "lr": lr,
                   **train_one_epoch(model, loader, loss_fn, optimizer, device, precision)}
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)
    scheduler.step(epoch + 1)
    return metrics


def train_one_epoch(
    model: nn.Module,
    loader: Any,
    loss_fn: BotLoss,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    precision: Precision | None = None,
) -> dict[str, float]:
    """One pass over `loader` (batches of images, labels, camids); returns mean losses, identity
    accuracy, time and throughput.

    The sums stay on the device until the epoch ends, so the step never waits for the GPU: one host
    sync per epoch. They are float64, added in the order the per-step Python floats were, so a CPU
    run gives the same numbers to the last bit."""
    precision = precision or Precision.for_device(device)
    model.train()
    names: list[str] = []
    totals: torch.Tensor | None = None  # per loss term, in `names` order
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = steps = 0
    start = time.perf_counter()
    for images, labels, _ in loader:
        images = images.to(device, non_blocking=True, memory_format=precision.memory_format)
        labels = labels.to(device, non_blocking=True)
        with precision.autocast():
            output: ReidOutput = model(images)
            losses = loss_fn(output, labels)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(losses["loss"])
        precision.step(optimizer)
        step = torch.stack([value.detach().double() for value in losses.values()])
        names, totals = (list(losses), step) if totals is None else (names, totals + step)
        correct += (output.logits.detach().argmax(dim=1) == labels).sum()
        seen += len(labels)
        steps += 1
    if totals is None:
        raise RuntimeError("the PK sampler produced no batch for this rank; lower ids_per_batch")
    *sums, correct_total = torch.cat([totals, correct.double().view(1)]).tolist()  # the epoch's one sync
    seconds = time.perf_counter() - start  # after .tolist(), which waits for the GPU's queued work
    return {
        **{name: total / steps for name, total in zip(names, sums)},
        "train_accuracy": correct_total / seen,
        "epoch_seconds": seconds,
        "images_per_second": seen / seconds,
    }


def _report(
    model: nn.Module, optimizer: torch.optim.Optimizer, epochs_done: int, history: list[dict[str, float]], rank: int
) -> None:
    """`ray.train.report` on every rank (it is a barrier); rank 0 attaches the checkpoint."""
    def write(directory: Path) -> None:
        write_checkpoint(directory, model, optimizer, epochs_done, history)

    report_checkpoint(dict(history[-1]) if history else {"epoch": epochs_done}, write if rank == 0 else None)


def write_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epochs_done: int,
                     history: list[dict[str, float]]) -> None:
    """The Re-ID trainer's checkpoint files (`trainers.checkpoint` plus the user's backbone) in `directory`."""
    model = unwrap_model(model)
    save_backbone_safetensors(model, directory / BACKBONE_FILE)
    save_training_state(directory, TrainingState(cpu_state(model), optimizer.state_dict(), epochs_done, history))
