"""Pre-training under Ray Train: `TorchTrainer` (DDP, one rank per worker) fed by Ray Data.

`pretrain` is the driver side. It checks the shards (before Ray starts anything), builds the
Ray Data stream (`data.build_train_dataset`), runs `train_loop_per_worker` on `num_workers`
workers and exports the result. Each epoch every rank calls `ray.train.report` with a checkpoint
folder; Ray merges the ranks' files into one `trainers.checkpoint` folder: `model.safetensors`
(the whole classifier), `backbone.safetensors`, `optimizer.pt`, `scheduler.pt`, `rng_rank<R>.pt`
(rank R's torch / CUDA / numpy / python RNG states) and `state.json`, which also records the arch,
the classes and the epochs the loop (re)started at.

Ray restarts a failed worker group from the latest of these (`FailureConfig`), and a rerun into
the same output folder resumes from it (Ray's run snapshot, or failing that the latest complete
checkpoint folder found on disk).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint, ScalingConfig
from safetensors.torch import save_file
from torch import nn

from core.storage import Location, local_folder, resolve, user_path
from trainers.checkpoint import (BACKBONE_FILE, MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, SCHEDULER_FILE, STATE_FILE,
                                 TrainingState, cpu_state, save_training_state)
from trainers.ray_train import fit, quiet_ray_train_reports, read_checkpoint, report_checkpoint, start_run
from core.settings.pretrain import BatchPlan, PretrainConfig, plan_batches
from trainers.pretrain.data import IMAGE_KEY, LABEL_KEY, build_train_dataset, train_batches
from trainers.pretrain.export import export_backbone
from trainers.pretrain.plots import CURVES_CSV, CURVES_PNG, write_curves
from trainers.pretrain.recipe import (
    BatchAugment,
    backbone_state_dict,
    build_loss,
    build_model,
    build_optimizer,
    build_scheduler,
    scheduler_matches,
    scheduler_state,
)
from trainers.pretrain.shards import ShardError, ShardSummary, inspect_shards
from trainers.device import Precision, train_worker_device
from trainers.weights import unwrap_model

RUN_NAME = "pretrain"

# Worker-side progress goes through logging: Ray Train routes it to the driver once (a `print`
# in a Ray Train worker is both teed to stdout and logged, so it shows up twice).
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainResult:
    """Where a finished `pretrain` run put its outputs, and what it measured per epoch."""

    backbone_path: Path | str  # CKPT_DIR/backbone.safetensors (a Path when local, else its URI)
    model_path: Path | str  # CKPT_DIR/model.safetensors (with the identity classifier)
    curves_csv: Path | str
    curves_png: Path | str
    num_classes: int
    history: list[dict[str, float]]  # one entry per epoch: epoch, lr, loss, train_accuracy, ...
    starts: list[int]  # the epoch each (re)start of the training loop began at: [0] = one clean run
    run_dir: Path | str  # Ray Train's run folder with the per-epoch checkpoints


class ResumeMismatchError(ValueError):
    """The output folder holds a run of a different model; resuming it would fail or mislead."""


def prepare_run(data_dir: str | Path, out_dir: str | Path, config: PretrainConfig,
                run_name: str = RUN_NAME) -> tuple[ShardSummary, BatchPlan, Location | None]:
    """Every check that can fail before training: the shards (`ShardError`), the batch split,
    the shards against the batch, and a previous run in `out_dir` against this config
    (`ResumeMismatchError`). Returns the shard summary, the batch plan and the checkpoint to
    resume from (None: start fresh). Starts nothing."""
    summary = inspect_shards(data_dir)
    plan = plan_batches(config.batch_size, config.num_workers, config.max_batch_per_step,
                        even=config.mixup_enabled)
    if summary.num_rows // plan.num_workers < plan.per_worker:
        raise ShardError(
            f"{summary.shards_dir} holds {summary.num_rows} images, too few for one step of "
            f"batch_size={config.batch_size} over {config.num_workers} worker(s); lower pretrain.batch_size"
        )
    latest = find_latest_checkpoint(resolve(out_dir) / run_name)
    if latest is not None:
        state = (latest / STATE_FILE).read_json()
        ours = {"arch": config.arch, "num_classes": summary.num_classes, "model_kwargs": config.model_kwargs}
        theirs = {key: state.get(key) for key in ours}
        if theirs != ours:
            raise ResumeMismatchError(
                f"{out_dir} holds a pre-training run of {theirs}, but this one is {ours}; "
                "use another --out to start a new run"
            )
    return summary, plan, latest


def pretrain(
    data_dir: str | Path, out_dir: str | Path, config: PretrainConfig, run_name: str = RUN_NAME
) -> PretrainResult:
    """Pre-train `config.arch` on `DATA_DIR/shards` by identity classification, with Ray Train.

    Joins the Ray cluster of `RAY_ADDRESS` or the one already initialised, else starts a local one.
    Resumes when `out_dir` holds checkpoints of the same model. Writes `out_dir/backbone.safetensors`
    (+ `backbone.json`), `model.safetensors`, `curves.csv`, `curves.png` and the resolved `config.yaml`.
    """
    out = resolve(out_dir)  # a local folder or any URI (s3://, gs://): Ray Train's storage_path
    summary, plan, latest = prepare_run(data_dir, out, config, run_name)
    use_gpu = start_run(out, config)
    loop_config = {"config": config.model_dump(mode="json"), "plan": plan.model_dump(),
                   "num_classes": summary.num_classes, "out_dir": out.uri, "run_dir": (out / run_name).uri}
    scaling = ScalingConfig(num_workers=config.num_workers, use_gpu=bool(use_gpu),
                            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if use_gpu else {})})
    checkpoint = fit(train_loop_per_worker, loop_config, scaling, out, run_name, keep=config.checkpoints_to_keep,
                     max_failures=config.max_failures, datasets={"train": build_train_dataset(summary.files, config)})
    # Exports are written locally, then copied when the output is an object store.
    with checkpoint.as_directory() as checkpoint_dir, local_folder(out) as target:
        checkpoint_dir = Path(checkpoint_dir)
        shutil.copy2(checkpoint_dir / MODEL_FILE, target / MODEL_FILE)
        export_backbone(checkpoint_dir / BACKBONE_FILE, target / BACKBONE_FILE, config, num_classes=summary.num_classes)
        state = json.loads((checkpoint_dir / STATE_FILE).read_text())
        history = state["history"]
        write_curves(history, target)
    return PretrainResult(
        backbone_path=user_path(out / BACKBONE_FILE), model_path=user_path(out / MODEL_FILE),
        curves_csv=user_path(out / CURVES_CSV), curves_png=user_path(out / CURVES_PNG),
        num_classes=summary.num_classes, history=history, starts=state["starts"], run_dir=user_path(out / run_name),
    )


def find_latest_checkpoint(run_dir: str | Path | Location) -> Location | None:
    """The checkpoint folder under `run_dir` (any URI) with the most epochs done (None when there
    is none; ties go to the later folder name). Only folders holding all of rank 0's files count:
    a process killed while Ray was copying a checkpoint into place can leave one incomplete."""
    run_dir = resolve(run_dir)
    folders: dict[str, set[str]] = {}
    for location in run_dir.files(recursive=True):  # one listing, also on an object store
        parts = location.path[len(run_dir.path.rstrip("/")) + 1:].split("/")
        if len(parts) == 2 and parts[0].startswith("checkpoint_"):
            folders.setdefault(parts[0], set()).add(parts[1])
    best: tuple[int, str] | None = None
    for folder, names in folders.items():
        if not {STATE_FILE, MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE} <= names:
            continue
        try:
            epoch = _epochs_done(run_dir / folder)
        except (ValueError, KeyError, TypeError):
            continue
        if best is None or (epoch, folder) > best:
            best = (epoch, folder)
    return run_dir / best[1] if best is not None else None


# ------------------------------------------------------------------------------------------
# worker side


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One DDP rank: build, restore, train the remaining epochs, report a checkpoint each epoch."""
    config = PretrainConfig.model_validate(loop_config["config"])
    plan = BatchPlan.model_validate(loop_config["plan"])
    num_classes = int(loop_config["num_classes"])
    out_dir = resolve(loop_config["out_dir"])
    torch.set_num_threads(max(1, int(config.cpus_per_worker)))
    quiet_ray_train_reports()
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = train_worker_device()  # DeviceUnusable when Ray's GPU cannot be used
    precision = Precision.for_device(device)

    torch.manual_seed(config.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model = build_model(config, num_classes)
    restored, rng = read_checkpoint(_resume_checkpoint(resolve(loop_config["run_dir"])), rank)
    if restored is not None:
        model.load_state_dict(restored.model)
    model = ray.train.torch.prepare_model(model.to(memory_format=precision.memory_format))
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    start_epoch, history, starts = 0, [], [0]
    if restored is not None:
        optimizer.load_state_dict(restored.optimizer)
        if scheduler_matches(scheduler, restored.scheduler):
            scheduler.load_state_dict({k: v for k, v in restored.scheduler.items() if k != "__class__"})
        elif rank == 0:
            logger.info("pretrain: the schedule changed since the checkpoint (epochs=%d now); "
                        "continuing on the new schedule", config.epochs)
        start_epoch, history = restored.epoch, restored.history
        starts = restored.extra["starts"] + [start_epoch]
    if rng is not None:
        _set_rng_state(rng, device)
    else:  # augmentation draws differ per rank (also when resumed with more workers than saved their RNG)
        _seed_everything(config.seed + 1000 * rank + start_epoch)

    if start_epoch >= config.epochs:  # nothing left to do: hand the restored result back
        _report(model, optimizer, scheduler, start_epoch, history, starts, rank, num_classes, config, device)
        return
    shard = ray.train.get_dataset_shard("train")
    augment = BatchAugment(config, num_classes, device)
    loss_fn = build_loss(config)
    for epoch in range(start_epoch, config.epochs):
        _maybe_inject_fault(config, epoch, rank, out_dir)
        scheduler.step(epoch)  # timm: sets this epoch's lr from the schedule
        lr = optimizer.param_groups[0]["lr"]
        batches = train_batches(shard, config, plan.per_worker, device)
        metrics = train_one_epoch(model, batches, augment, loss_fn, optimizer, plan, device, precision)
        history.append({"epoch": epoch + 1, "lr": lr, **metrics})
        if rank == 0:
            logger.info("pretrain: epoch %d/%d loss %.4f acc %.3f lr %.2e %.1f img/s", epoch + 1, config.epochs,
                        metrics["loss"], metrics["train_accuracy"], lr, metrics["images_per_second"])
        _report(model, optimizer, scheduler, epoch + 1, history, starts, rank, num_classes, config, device)


def train_one_epoch(
    model: nn.Module,
    batches: Any,
    augment: BatchAugment,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    plan: BatchPlan,
    device: torch.device,
    precision: Precision | None = None,
) -> dict[str, float]:
    """One pass over this rank's batches: each batch of `plan.per_worker` images is one optimizer
    step, accumulated over `plan.accumulation_steps` micro-batches (DDP syncs gradients on the
    last one only). Loss and accuracy (against the un-mixed labels) are averaged over all ranks.
    `precision`: the same one every epoch (None: `Precision.for_device(device)`)."""
    precision = precision or Precision.for_device(device)
    model.train()
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = steps = 0
    start = time.perf_counter()
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        micro_images = batch[IMAGE_KEY].split(plan.micro_batch)
        micro_labels = batch[LABEL_KEY].split(plan.micro_batch)
        for index, (images, labels) in enumerate(zip(micro_images, micro_labels)):
            inputs, targets = augment(images, labels)
            last = index == len(micro_images) - 1
            with model.no_sync() if ddp and not last else nullcontext():
                with precision.autocast():
                    logits = model(inputs)
                    loss = loss_fn(logits, targets)
                precision.backward(loss / len(micro_images))
            loss_sum += loss.detach() * len(labels)
            correct += (logits.detach().argmax(dim=1) == labels).sum()
            seen += len(labels)
        precision.step(optimizer)
        steps += 1
    totals = torch.stack([loss_sum, correct.float(), torch.tensor(float(seen), device=device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss_total, correct_total, seen_total = totals.tolist()
    seconds = time.perf_counter() - start  # after .tolist(), which waits for the GPU's queued work
    if seen_total == 0:
        raise RuntimeError("no training batch this epoch: fewer images than one global batch")
    return {
        "loss": loss_total / seen_total,
        "train_accuracy": correct_total / seen_total,
        "steps": steps,  # the same on every rank
        "images": int(seen_total),
        "epoch_seconds": seconds,
        "images_per_second": seen_total / seconds,
    }


def _maybe_inject_fault(config: PretrainConfig, epoch: int, rank: int, out_dir: Location) -> None:
    """The `fault_injection` testing hook: die abruptly, once per output folder."""
    injection = config.fault_injection
    if injection is None or injection.epoch != epoch or injection.rank != rank:
        return
    marker = out_dir / injection.marker
    if marker.exists():
        return
    marker.write_text(f"rank {rank} killed itself at the start of epoch {epoch}\n")
    logger.warning("pretrain: fault injection: rank %d exits at epoch %d", rank, epoch)
    os._exit(1)


# ------------------------------------------------------------------------------------------
# checkpoints


def _report(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, epochs_done: int,
    history: list[dict[str, float]], starts: list[int], rank: int, num_classes: int, config: PretrainConfig,
    device: torch.device,
) -> None:
    """`ray.train.report` on every rank (a barrier). Each rank contributes its RNG states; rank 0
    also the weights, optimizer, scheduler and `state.json` (written last: marks a complete folder)."""
    def write(directory: Path) -> None:
        torch.save(_get_rng_state(device), directory / RNG_FILE.format(rank=rank))
        if rank == 0:
            module = unwrap_model(model)
            save_file(backbone_state_dict(module), str(directory / BACKBONE_FILE))
            save_training_state(directory, TrainingState(
                cpu_state(module), optimizer.state_dict(), epochs_done, history, scheduler=scheduler_state(scheduler),
                extra={"arch": config.arch, "num_classes": num_classes, "model_kwargs": config.model_kwargs,
                       "starts": starts}))

    report_checkpoint(dict(history[-1]) if history else {"epoch": epochs_done}, write)


def _resume_checkpoint(run_dir: Location) -> Checkpoint | None:
    """The checkpoint to resume from: Ray's latest (after a worker failure, or restored from the run
    snapshot on a rerun), unless a complete one with more epochs is on disk. That happens when a
    worker dies right after `ray.train.report` returned, before the controller registered the
    report, and on a rerun whose Ray run snapshot is missing (Ray Train v2 dropped
    `resume_from_checkpoint`)."""
    registered = ray.train.get_checkpoint()
    on_disk = find_latest_checkpoint(run_dir)
    if on_disk is None:
        return registered
    if registered is not None:
        with registered.as_directory() as directory:
            if _epochs_done(resolve(directory)) >= _epochs_done(on_disk):
                return registered
    return Checkpoint(path=on_disk.path, filesystem=on_disk.filesystem)


def _epochs_done(checkpoint_dir: Location) -> int:
    return int((checkpoint_dir / STATE_FILE).read_json()["epoch"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _get_rng_state(device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    """The RNG states the training step draws from (torch for erasing noise, numpy for Mixup's
    lambda, python's `random` for erasing boxes), as tensors and plain values; `device`'s CUDA
    generator only when it is a GPU (a worker Ray gave none never touches CUDA)."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": int(position), "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(gauss),
        "python_version": int(version), "python_state": torch.tensor(python_state, dtype=torch.int64),
        "python_gauss": gauss_next,
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device = torch.device("cpu")) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    random.setstate((state["python_version"], tuple(int(x) for x in state["python_state"].tolist()),
                     state["python_gauss"]))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
