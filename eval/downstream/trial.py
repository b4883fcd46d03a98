"""One cell as a Ray Tune trial: fine-tune and evaluate it (`fine_tune_cell`), checkpoint and
resume it, write its result to the output URI (`run_trial`)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from typing import Any

import torch
from ray import tune
from torch import nn

from core.datasets.base import ReidDataset
from core.device import actor_device
from core.storage import Location
from eval.downstream.cells import EXECUTIONS_FILE, RESULT_FILE, Cell, read_cell_result
from core.settings.downstream import ADAPTATION, GENERALIZATION, INIT_RANDOM, UNSUPERVISED, DownstreamConfig
from eval.downstream.inits import InitWeights, build_initialised_backbone
from eval.downstream.methods import METHODS, ReidMethod
from eval.downstream.settings import training_subset
from eval.downstream.tables import METRICS, STATUS_DONE
from trainers.checkpoint import TrainingState, cpu_state, save_training_state
from core.settings.reid import ReidTrainConfig
from trainers.ray_train import read_checkpoint, report_checkpoint
from trainers.reid.data import TrainingSet, make_train_loader
from trainers.reid.evaluate import evaluate_reid
from trainers.reid.schedule import build_lr_scheduler, build_optimizer
from trainers.device import Precision
from trainers.reid.train import run_epoch


# ------------------------------------------------------------------------------------------
# One cell: fine-tune and evaluate


# (epoch metrics, state to checkpoint or None) -> None
EpochReporter = Callable[[dict[str, Any], "TrainingState | None"], None]


def build_cell_model(
    method: ReidMethod, options: Any, recipe: ReidTrainConfig, init: InitWeights, num_classes: int, seed: int
) -> tuple[nn.Module, nn.Module]:
    """(model, loss) of a cell; random weights follow `seed`."""
    torch.manual_seed(seed)
    backbone = build_initialised_backbone(recipe.arch, init, recipe.last_stride)
    model = method.build_model(backbone, num_classes, recipe, options)
    return model, method.build_loss(model, num_classes, recipe, options)


def train_supervised(
    method: ReidMethod,
    options: Any,
    recipe: ReidTrainConfig,
    init: InitWeights,
    training: TrainingSet,
    seed: int,
    device: torch.device,
    restored: TrainingState | None = None,
    report: EpochReporter | None = None,
    checkpoint_every: int = 0,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """(trained model, per-epoch history): `method` fine-tuned from `init` on `training` with
    `recipe` (the PK sampler's P capped at the identities there are: a small Ss subset can have
    fewer than `ids_per_batch`). Resumes from `restored`; `report` sees every epoch, with the state
    to checkpoint every `checkpoint_every` epochs."""
    if training.num_classes < 2:
        raise ValueError(f"{training.num_classes} training identities; metric learning needs 2")
    recipe = recipe.model_copy(update={"seed": seed, "init": INIT_RANDOM,
                                       "ids_per_batch": min(recipe.ids_per_batch, training.num_classes)})
    model, loss_fn = build_cell_model(method, options, recipe, init, training.num_classes, seed)
    precision = Precision.for_device(device)  # one for the whole run: the fp16 scaler adapts over it
    model.to(device, memory_format=precision.memory_format)
    loss_fn.to(device)
    optimizer = build_optimizer(model, recipe)
    start_epoch, history = 0, []
    if restored is not None:
        model.load_state_dict(restored.model)
        loss_fn.load_state_dict(restored.loss)
        optimizer.load_state_dict(restored.optimizer)
        start_epoch, history = restored.epoch, list(restored.history)
    scheduler = build_lr_scheduler(optimizer, recipe, start_epoch)
    torch.manual_seed(seed + 1000 + start_epoch)  # augmentation draws
    loader = make_train_loader(training, recipe, device=device)
    for epoch in range(start_epoch, recipe.epochs):
        metrics = run_epoch(epoch, model, loader, loss_fn, optimizer, scheduler, device, precision)
        history.append(metrics)
        if report is not None:
            checkpoint = checkpoint_every and ((epoch + 1) % checkpoint_every == 0) and epoch + 1 < recipe.epochs
            state = TrainingState(model=cpu_state(model), loss=cpu_state(loss_fn), optimizer=optimizer.state_dict(),
                                  epoch=epoch + 1, history=list(history)) if checkpoint else None
            report(metrics, state)
    return model, history


def fine_tune_cell(
    cell: Cell,
    dataset: ReidDataset,
    config: DownstreamConfig,
    init: InitWeights,
    method: ReidMethod | None = None,
    device: torch.device | str = "cpu",
    restored: TrainingState | None = None,
    report: EpochReporter | None = None,
    images: Mapping[str, bytes] | None = None,
) -> dict[str, Any]:
    """Fine-tune `cell` (a supervised, Fs or Ss cell) on its training subset of `dataset` and
    evaluate on query/gallery.

    Returns the result record (metrics as fractions in [0, 1], the CMC curve, subset sizes,
    timings, per-epoch history). `method` defaults to the registered `cell.method`. `report` is
    called after every epoch with the metrics and, every `checkpoint_every` epochs, the state to
    checkpoint. `images` (path -> encoded bytes, read by the driver) spare the trial any access to
    the dataset's files.
    """
    start = time.perf_counter()
    device = torch.device(device)
    method = method or METHODS.get(cell.method)
    options = method.options(cell.method, config.method_options.get(cell.method))
    all_train = [r for r in dataset.train if not r.distractor]
    records = training_subset(dataset.train, cell.setting, cell.seed,
                              config.fs_min_images_per_id, config.ss_min_identities)
    training = TrainingSet.from_records(records, images)
    if training.num_classes < 2:
        raise ValueError(f"{cell.key}: {training.num_classes} training identities; metric learning needs 2")
    recipe = method.adjust_recipe(config.train, options)
    train_start = time.perf_counter()
    model, history = train_supervised(method, options, recipe, init, training, cell.seed, device, restored,
                                      report, config.checkpoint_every)
    train_seconds = time.perf_counter() - train_start
    metrics = evaluate_reid(model, dataset, recipe, device=device, images=images)
    return {
        **cell.params(),
        "status": STATUS_DONE,
        "kind": cell.setting.kind,
        "percent": cell.setting.percent,
        **{k: metrics[k] for k in METRICS},
        "cmc": metrics["cmc"],
        "train_images": len(training.paths),
        "train_ids": training.num_classes,
        "image_fraction": len(training.paths) / max(1, len(all_train)),
        "id_fraction": training.num_classes / max(1, len({(r.source, r.pid) for r in all_train})),
        "ids_per_batch": min(recipe.ids_per_batch, training.num_classes),
        "epochs": recipe.epochs,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
        "weights": init.source,
        "history": history,
    }


# ------------------------------------------------------------------------------------------
# Tune trial


@dataclass
class TrialContext:
    """Everything a trial needs, shipped once through the object store (`tune.with_parameters`)."""

    config: DownstreamConfig
    out_dir: Location  # travels as its URI; each trial's node resolves it
    datasets: dict[str, ReidDataset]
    inits: dict[str, InitWeights]
    # Each dataset's images (path -> encoded bytes), read once by the driver: trials on any node
    # train and evaluate from them, with no access to the dataset's filesystem.
    images: dict[str, dict[str, bytes]] = field(default_factory=dict)
    # The driver's registry entries: a method registered at run time reaches the workers too
    # (its functions travel by reference, so their module must be importable there).
    methods: dict[str, ReidMethod] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)  # cell key -> digest


def _report_epoch(metrics: dict[str, Any], state: TrainingState | None) -> None:
    report_checkpoint(metrics, partial(save_training_state, state=state) if state is not None else None,
                      tune.report, tune.Checkpoint)


def run_trial(params: dict[str, Any], context: TrialContext) -> None:
    """Tune function trainable: one cell (`params["cell"]`)."""
    cell = Cell.from_params(params["cell"])
    digest = context.digests[cell.key]
    cell_dir = cell.directory(context.out_dir)
    finished = read_cell_result(context.out_dir, cell, digest)
    if finished is not None:  # done by an earlier run that Tune's own state did not record
        tune.report({"mAP": finished["mAP"], "rank1": finished["rank1"], "reused": True})
        return
    torch.set_num_threads(max(1, int(context.config.cpus_per_trial)))
    # From the GPU ids Ray assigned the trial: none = CPU without touching CUDA; ids torch cannot use
    # stop the trial with DeviceUnusable. The request decides only outside Ray.
    requested = context.config.gpus_per_trial
    device = torch.device(actor_device(0.0 if requested == "auto" else requested))
    restored, _ = read_checkpoint(tune.get_checkpoint())
    # One line per execution; read and rewritten whole, since object stores cannot append
    # (one trial per cell at a time, so there is no other writer).
    executions = cell_dir / EXECUTIONS_FILE
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    earlier = executions.read_text() if executions.exists() else ""
    executions.write_text(f"{earlier}{stamp} pid={os.getpid()} device={device} "
                          f"from_epoch={restored.epoch if restored else 0}\n")
    if cell.key in context.config.debug_fail_cells:
        raise RuntimeError(f"injected failure of {cell.key} (downstream.debug_fail_cells)")
    result = run_cell(cell, context, device, restored)
    result["digest"] = digest
    (cell_dir / RESULT_FILE).write_bytes(json.dumps(result, indent=2).encode())
    tune.report({k: result[k] for k in ("mAP", "rank1", "train_seconds")})


def _report_metrics(metrics: dict[str, Any]) -> None:
    tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})


def run_cell(cell: Cell, context: TrialContext, device: torch.device,
             restored: TrainingState | None = None) -> dict[str, Any]:
    """The cell's result record, by its setting: supervised / Fs / Ss fine-tune one dataset (and
    resume from checkpoints), `unsupervised` and `da` train without target labels, `dg` trains on
    the merged sources and tests on unseen targets."""
    # Imported here: those modules build on this one's supervised loop (`train_supervised`).
    from eval.downstream.generalization import run_generalization_cell
    from eval.downstream.unsupervised import run_adaptation_cell, run_unsupervised_cell

    config, init, kind = context.config, context.inits[cell.init], cell.setting.kind
    if kind == UNSUPERVISED:
        return run_unsupervised_cell(cell, context.datasets[cell.dataset], config, init, device,
                                     images=context.images.get(cell.dataset), report=_report_metrics)
    if kind == ADAPTATION:
        pair = next(p for p in config.adaptation if p.name == cell.dataset)
        return run_adaptation_cell(cell, context.datasets[pair.source], context.datasets[pair.target], config, init,
                                   device, context.images, report=_report_metrics)
    if kind == GENERALIZATION:
        kinds = {d.source_name: d.kind for d in config.datasets}
        return run_generalization_cell(cell, context.datasets, kinds, config, init, device, context.images,
                                       method=context.methods.get(cell.method),
                                       report=lambda metrics, state: _report_metrics(metrics))
    return fine_tune_cell(cell, context.datasets[cell.dataset], config, init, method=context.methods.get(cell.method),
                          device=device, restored=restored, report=_report_epoch,
                          images=context.images.get(cell.dataset))


def trial_dirname(trial: Any) -> str:
    params = trial.config["cell"]
    name = "_".join(str(params[k]) for k in ("dataset", "method", "init", "setting")) + f"_seed{params['seed']}"
    return name.replace("->", "-to-").replace("/", "_")


def trial_name(trial: Any) -> str:
    return Cell.from_params(trial.config["cell"]).key
