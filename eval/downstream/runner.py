"""The downstream grid under Ray Tune: one trial per dataset x method x init x setting x seed.

Driver side (`run_downstream`), before any trial starts: validate methods and their options,
load the datasets (generating the procedural benchmark when absent), resolve the three
initialisations (the evaluated backbone is checked against the arch here, so a wrong file fails
with the offending keys named, not in every trial), and build each method once as a dry run.

Each trial fine-tunes one cell with the BoT trainer's pieces (PK sampler, transforms, Adam +
warm-up/step schedule, `train_one_epoch`, `evaluate_reid`) on the resources Tune gives it (a
GPU when there is one) and writes `cells/<dataset>/<method>/<init>/<setting>/seed<k>/result.json`.

Resume, two layers: a finished cell's `result.json` carries a digest of everything that
determines it (recipe, method options, dataset, weights, setting, seed), and a trial whose cell
already has a result under the same digest reports it without training; and when the Tune
experiment of the same grid exists, it is continued with `Tuner.restore` (unfinished and errored
trials resume, from their last checkpoint when `checkpoint_every` is set). Every trial that
trains appends a line to its cell's `executions.log`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import torch
from ray import tune
from safetensors.torch import load_file, save_file
from torch import nn

from core.storage import Location, local_folder, resolve, user_path
from eval.downstream.config import INIT_IMAGENET, INIT_OURS, INIT_RANDOM, DownstreamConfig
from eval.downstream.inits import InitWeights, build_initialised_backbone, load_ours, random_init, resolve_imagenet
from eval.downstream.methods import ReidMethod, get_method
from eval.downstream.settings import Setting, training_subset
from eval.downstream.tables import (
    STATUS_DONE,
    STATUS_ERROR,
    STATUS_MISSING,
    STATUS_UNAVAILABLE,
    results_frame,
    results_markdown,
    write_results_csv,
)
from core.config import ConfigError, config_to_yaml
from core.datasets.base import DatasetError, ReidDataset
from core.datasets.registry import load_source
from core.datasets.images import read_images
from core.cluster import RayConfig, cluster_gpus, init_ray
from trainers.config import ReidTrainConfig
from trainers.reid.data import TrainingSet, make_train_loader
from trainers.reid.evaluate import evaluate_reid
from trainers.reid.schedule import build_lr_scheduler, build_optimizer
from trainers.reid.train import train_one_epoch

RESULT_FILE = "result.json"
EXECUTIONS_FILE = "executions.log"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
CONFIG_FILE = "config.yaml"
_CHECKPOINT_MODEL, _CHECKPOINT_LOSS = "model.safetensors", "loss.safetensors"
_CHECKPOINT_OPTIMIZER, _CHECKPOINT_STATE = "optimizer.pt", "state.json"


@dataclass(frozen=True, order=True)
class Cell:
    """One point of the grid, and one Tune trial."""

    dataset: str
    method: str
    init: str
    setting: Setting
    seed: int

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.method}/{self.init}/{self.setting.name}/seed{self.seed}"

    def params(self) -> dict[str, Any]:
        """The trial's config entry (plain JSON, as Tune stores it)."""
        return {"dataset": self.dataset, "method": self.method, "init": self.init,
                "setting": self.setting.name, "seed": self.seed}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Cell:
        return cls(params["dataset"], params["method"], params["init"], Setting.parse(params["setting"]),
                   int(params["seed"]))

    def directory(self, out_dir: Location | str) -> Location:
        safe = [part.replace("/", "_") for part in (self.dataset, self.method, self.init, self.setting.name)]
        return resolve(out_dir) / "/".join(["cells", *safe, f"seed{self.seed}"])


def plan_cells(config: DownstreamConfig) -> list[Cell]:
    """The grid: dataset x method x init x setting x seed, with the Fs/Ss settings limited to
    `fraction_datasets` / `fraction_methods` when those are given."""
    cells = []
    for source in config.datasets:
        for method in config.methods:
            for setting in config.setting_list:
                if setting.kind != "supervised":
                    if config.fraction_datasets and source.source_name not in config.fraction_datasets:
                        continue
                    if config.fraction_methods and method not in config.fraction_methods:
                        continue
                for init in config.inits:
                    for seed in config.seeds:
                        cells.append(Cell(source.source_name, method, init, setting, seed))
    return cells


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def cell_digest(cell: Cell, config: DownstreamConfig, init: InitWeights) -> str:
    """Changes whenever anything that determines the cell's result does."""
    source = next(d for d in config.datasets if d.source_name == cell.dataset)
    return _digest({
        "cell": cell.params(),
        "train": config.train.model_dump(mode="json"),
        "method_options": config.method_options.get(cell.method, {}),
        "dataset": source.model_dump(mode="json"),
        "weights": init.digest,
        "fs_min_images_per_id": config.fs_min_images_per_id,
        "ss_min_identities": config.ss_min_identities,
    })


def read_cell_result(out_dir: Location | str, cell: Cell, digest: str) -> dict[str, Any] | None:
    """The cell's finished result if it was computed under `digest`, else None."""
    location = cell.directory(out_dir) / RESULT_FILE
    try:
        result = json.loads(location.read_bytes())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return result if result.get("digest") == digest else None


def count_executions(out_dir: Location | str, cell: Cell) -> int:
    """How many trials started training this cell (lines of its `executions.log`)."""
    location = cell.directory(out_dir) / EXECUTIONS_FILE
    return len(location.read_text().splitlines()) if location.exists() else 0


def _write_json(location: Location, data: Any) -> None:
    location.write_bytes(json.dumps(data, indent=2).encode())


# ------------------------------------------------------------------------------------------
# One cell: fine-tune and evaluate


@dataclass
class TrainingState:
    """What a trial checkpoint restores."""

    model: dict[str, torch.Tensor]
    loss: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    epoch: int
    history: list[dict[str, float]]


# (epoch metrics, state to checkpoint or None) -> None
EpochReporter = Callable[[dict[str, Any], "TrainingState | None"], None]


def cell_recipe(config: DownstreamConfig, method: ReidMethod, options: Any, cell: Cell, num_ids: int) -> ReidTrainConfig:
    """The cell's training config: the shared recipe as the method adjusts it, with the cell's
    seed, and the PK sampler's P capped at the identities there are (a small Ss subset can have
    fewer than `ids_per_batch`)."""
    recipe = method.adjust_recipe(config.train, options)
    return recipe.model_copy(update={
        "seed": cell.seed, "init": INIT_RANDOM, "ids_per_batch": min(recipe.ids_per_batch, num_ids),
    })


def build_cell_model(
    method: ReidMethod, options: Any, recipe: ReidTrainConfig, init: InitWeights, num_classes: int, seed: int
) -> tuple[nn.Module, nn.Module]:
    """(model, loss) of a cell; random weights follow `seed`."""
    torch.manual_seed(seed)
    backbone = build_initialised_backbone(recipe.arch, init, recipe.last_stride)
    model = method.build_model(backbone, num_classes, recipe, options)
    return model, method.build_loss(model, num_classes, recipe, options)


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
    """Fine-tune `cell` on its training subset of `dataset` and evaluate on query/gallery.

    Returns the result record (metrics as fractions in [0, 1], the CMC curve, subset sizes,
    timings, per-epoch history). `method` defaults to the registered `cell.method`. `report` is
    called after every epoch with the metrics and, every `checkpoint_every` epochs, the state to
    checkpoint. `images` (path -> encoded bytes, read by the driver) spare the trial any access to
    the dataset's files.
    """
    start = time.perf_counter()
    device = torch.device(device)
    method = method or get_method(cell.method)
    options = method.options(config.method_options.get(cell.method))
    all_train = [r for r in dataset.train if not r.distractor]
    records = training_subset(dataset.train, cell.setting, cell.seed,
                              config.fs_min_images_per_id, config.ss_min_identities)
    training = TrainingSet.from_records(records, images)
    if training.num_classes < 2:
        raise ValueError(f"{cell.key}: {training.num_classes} training identities; metric learning needs 2")
    recipe = cell_recipe(config, method, options, cell, training.num_classes)
    model, loss_fn = build_cell_model(method, options, recipe, init, training.num_classes, cell.seed)
    model.to(device)
    loss_fn.to(device)
    optimizer = build_optimizer(model, recipe)
    scheduler = build_lr_scheduler(optimizer, recipe)
    start_epoch, history = 0, []
    if restored is not None:
        model.load_state_dict(restored.model)
        loss_fn.load_state_dict(restored.loss)
        optimizer.load_state_dict(restored.optimizer)
        start_epoch, history = restored.epoch, list(restored.history)
        with warnings.catch_warnings():  # fast-forwarding the schedule without optimizer steps is intended
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start_epoch):
                scheduler.step()
    torch.manual_seed(cell.seed + 1000 + start_epoch)  # augmentation draws
    loader = make_train_loader(training, recipe)
    train_start = time.perf_counter()
    for epoch in range(start_epoch, recipe.epochs):
        loader.batch_sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        metrics = {"epoch": epoch + 1, "lr": lr, **train_one_epoch(model, loader, loss_fn, optimizer, device)}
        scheduler.step()
        history.append(metrics)
        if report is not None:
            every = config.checkpoint_every
            checkpoint = every and ((epoch + 1) % every == 0) and epoch + 1 < recipe.epochs
            state = TrainingState(
                model={k: v.detach().cpu() for k, v in model.state_dict().items()},
                loss={k: v.detach().cpu() for k, v in loss_fn.state_dict().items()},
                optimizer=optimizer.state_dict(), epoch=epoch + 1, history=list(history),
            ) if checkpoint else None
            report(metrics, state)
    train_seconds = time.perf_counter() - train_start
    metrics = evaluate_reid(model, dataset, recipe, device=device, images=images)
    return {
        **cell.params(),
        "status": STATUS_DONE,
        "kind": cell.setting.kind,
        "percent": cell.setting.percent,
        **{k: metrics[k] for k in ("mAP", "rank1", "rank5", "rank10", "mINP")},
        "cmc": metrics["cmc"],
        "train_images": len(training.paths),
        "train_ids": training.num_classes,
        "image_fraction": len(training.paths) / max(1, len(all_train)),
        "id_fraction": training.num_classes / max(1, len({(r.source, r.pid) for r in all_train})),
        "ids_per_batch": recipe.ids_per_batch,
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


def _save_training_state(directory: Path, state: TrainingState) -> None:
    save_file({k: v.contiguous() for k, v in state.model.items()}, str(directory / _CHECKPOINT_MODEL))
    save_file({k: v.contiguous() for k, v in state.loss.items()}, str(directory / _CHECKPOINT_LOSS))
    torch.save(state.optimizer, directory / _CHECKPOINT_OPTIMIZER)
    (directory / _CHECKPOINT_STATE).write_text(json.dumps({"epoch": state.epoch, "history": state.history}))


def _load_training_state(directory: Path) -> TrainingState:
    meta = json.loads((directory / _CHECKPOINT_STATE).read_text())
    return TrainingState(
        model=load_file(str(directory / _CHECKPOINT_MODEL)),
        loss=load_file(str(directory / _CHECKPOINT_LOSS)),
        # weights_only: a checkpoint folder is data, never code to run
        optimizer=torch.load(directory / _CHECKPOINT_OPTIMIZER, map_location="cpu", weights_only=True),
        epoch=int(meta["epoch"]),
        history=list(meta["history"]),
    )


def _report_epoch(metrics: dict[str, Any], state: TrainingState | None) -> None:
    if state is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        _save_training_state(Path(tmp), state)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


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
    device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
    restored = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            restored = _load_training_state(Path(directory))
    # One line per execution; read and rewritten whole, since object stores cannot append
    # (one trial per cell at a time, so there is no other writer).
    executions = cell_dir / EXECUTIONS_FILE
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    earlier = executions.read_text() if executions.exists() else ""
    executions.write_text(f"{earlier}{stamp} pid={os.getpid()} device={device} "
                          f"from_epoch={restored.epoch if restored else 0}\n")
    result = fine_tune_cell(cell, context.datasets[cell.dataset], context.config, context.inits[cell.init],
                            method=context.methods.get(cell.method), device=device, restored=restored,
                            report=_report_epoch, images=context.images.get(cell.dataset))
    result["digest"] = digest
    _write_json(cell_dir / RESULT_FILE, result)
    tune.report({k: result[k] for k in ("mAP", "rank1", "mINP", "train_seconds")})


def trial_dirname(trial: Any) -> str:
    params = trial.config["cell"]
    return "_".join(str(params[k]) for k in ("dataset", "method", "init", "setting")) + f"_seed{params['seed']}"


def trial_name(trial: Any) -> str:
    return Cell.from_params(trial.config["cell"]).key


# ------------------------------------------------------------------------------------------
# Driver


@dataclass(frozen=True)
class DownstreamReport:
    """Where a `run_downstream` call wrote its outputs, and the per-cell rows."""

    out_dir: Path | str  # a Path when local, else the URI (so are the files below)
    results_csv: Path | str
    results_md: Path | str
    plots: list[Path | str]
    frame: pd.DataFrame
    trained: list[str]  # cells finished by this call (the others were done before or failed)
    errors: dict[str, str]
    seconds: float


def resolve_inits(config: DownstreamConfig, backbone: Path | None, hf_cache_dir: str | Path | None = None) -> dict[str, InitWeights]:
    """The initialisations the grid names; `ours` is checked against `train.arch` here."""
    inits: dict[str, InitWeights] = {}
    for name in config.inits:
        if name == INIT_OURS:
            if backbone is None:
                raise ConfigError("init 'ours' needs a backbone: pass --backbone FILE (or set downstream.backbone)")
            inits[name] = load_ours(backbone, config.train.arch)
        elif name == INIT_IMAGENET:
            inits[name] = resolve_imagenet(config.train.arch, config.imagenet_weights, hf_cache_dir)
        else:
            inits[name] = random_init()
    return inits


def check_methods(config: DownstreamConfig) -> None:
    """Unknown methods, bad options or an arch a method cannot use fail here, before Tune."""
    for name in config.methods:
        method = get_method(name)
        options = method.options(config.method_options.get(name))
        recipe = method.adjust_recipe(config.train, options)
        try:
            build_cell_model(method, options, recipe, random_init(), num_classes=2, seed=0)
        except ValueError as err:
            raise ConfigError(f"downstream.methods: {name} cannot be built on arch "
                              f"{recipe.arch!r}: {err}") from err


def _trial_resources(config: DownstreamConfig) -> dict[str, float]:
    gpus = config.gpus_per_trial
    if gpus == "auto":
        gpus = 1.0 if cluster_gpus() > 0 else 0.0
    return {"cpu": config.cpus_per_trial, "gpu": float(gpus)}


def _tuner(cells: Sequence[Cell], trainable: Any, config: DownstreamConfig, storage: Location, name: str) -> tune.Tuner:
    return tune.Tuner(
        trainable,
        param_space={"cell": tune.grid_search([cell.params() for cell in cells])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=config.max_concurrent_trials,
            reuse_actors=True,  # one process per concurrent slot: torch imports once, not per cell
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage.uri,
            failure_config=tune.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=1,
        ),
    )


def _fit(tuner: tune.Tuner, errors: dict[str, str]) -> None:
    for result in tuner.fit():
        key = Cell.from_params(result.config["cell"]).key
        if result.error is not None:
            lines = str(result.error).strip().splitlines() or [""]
            errors[key] = f"{type(result.error).__name__}: {lines[-1][:300]}"
        else:
            errors.pop(key, None)


def _run_tune(cells: Sequence[Cell], context: TrialContext, name: str) -> dict[str, str]:
    """Run the pending `cells` in the Tune experiment `name`; returns the errors by cell key.

    An existing experiment of this grid is continued first (`Tuner.restore`: unfinished and
    errored trials resume, finished ones stay finished). Cells it leaves without a result (it
    never scheduled them, or a result file was deleted) then run in a fresh experiment.
    """
    config = context.config
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), _trial_resources(config))
    storage = context.out_dir / "tune"
    path = storage / name
    errors: dict[str, str] = {}
    if tune.Tuner.can_restore(path.uri):
        print(f"resuming the Tune experiment {path}", flush=True)
        _fit(tune.Tuner.restore(path.uri, trainable, resume_unfinished=True, resume_errored=True), errors)
    left = [c for c in cells if c.key not in errors
            and read_cell_result(context.out_dir, c, context.digests[c.key]) is None]
    if left:
        path.delete_dir()  # its finished work lives on in cells/
        _fit(_tuner(left, trainable, config, storage, name), errors)
    return errors


def collect_rows(
    cells: Sequence[Cell], context: TrialContext, errors: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """One row per cell: its result, or why there is none."""
    rows = []
    for cell in cells:
        init = context.inits[cell.init]
        result = read_cell_result(context.out_dir, cell, context.digests[cell.key])
        base = {**cell.params(), "kind": cell.setting.kind, "percent": cell.setting.percent}
        if result is not None:
            row = {**base, **{k: v for k, v in result.items() if k not in ("cmc", "history", "digest")}}
            for metric in ("mAP", "rank1", "rank5", "rank10", "mINP"):
                row[metric] = 100.0 * float(result[metric])
            row["cmc"] = result["cmc"]
        elif not init.available:
            row = {**base, "status": STATUS_UNAVAILABLE, "reason": init.reason}
        elif errors and cell.key in errors:
            row = {**base, "status": STATUS_ERROR, "reason": errors[cell.key]}
        else:
            row = {**base, "status": STATUS_MISSING, "reason": "not run"}
        rows.append(row)
    return rows


def read_dataset_images(datasets: Mapping[str, ReidDataset]) -> dict[str, dict[str, bytes]]:
    """Every image of each dataset, read once here; an unreadable one stops the run before any
    trial starts (an evaluation with a missing gallery image would not be comparable)."""
    images = {}
    for name, dataset in datasets.items():
        loaded = read_images([r.path for r in (*dataset.train, *dataset.query, *dataset.gallery)])
        broken = {path: reason for path, reason in loaded.items() if not isinstance(reason, bytes)}
        if broken:
            listed = "; ".join(f"{path}: {reason}" for path, reason in list(broken.items())[:5])
            raise DatasetError(f"downstream.datasets: {name} has {len(broken)} unreadable images ({listed})")
        images[name] = loaded
    return images


def run_downstream(
    config: DownstreamConfig,
    backbone: str | Path | None = None,
    out_dir: str | Path | None = None,
    ray_config: RayConfig | None = None,
    hf_cache_dir: str | Path | None = None,
) -> DownstreamReport:
    """Evaluate `backbone` (default `config.backbone`) over the grid; outputs under `out_dir`
    (default `config.out_dir`): `results.csv`, `results.md`, `plots/`, `cells/`, `tune/`,
    `config.yaml`. Joins the running Ray cluster (or RAY_ADDRESS), else starts a local one.
    """
    start = time.perf_counter()
    out = resolve(out_dir if out_dir is not None else config.out_dir)  # a folder or any URI
    chosen = backbone if backbone is not None else config.backbone
    config = config.model_copy(update={"backbone": resolve(chosen).uri if chosen else None, "out_dir": out.uri})
    check_methods(config)
    inits = resolve_inits(config, config.backbone, hf_cache_dir)
    datasets = {source.source_name: load_source(source) for source in config.datasets}
    for name, dataset in datasets.items():
        if not dataset.query or not dataset.gallery:
            raise ConfigError(f"downstream.datasets: {name} has no query/gallery split to evaluate on")
        print(dataset.summary(), flush=True)
    for init in inits.values():
        if not init.available:
            print(f"{init.name} weights unavailable, cells reported as such: {init.reason}", flush=True)
    (out / CONFIG_FILE).write_text(config_to_yaml(config))

    cells = plan_cells(config)
    if any(s.kind != "supervised" for s in config.setting_list) and all(c.setting.kind == "supervised" for c in cells):
        print("note: fraction_datasets / fraction_methods leave no Fs/Ss cell to run", flush=True)
    digests = {cell.key: cell_digest(cell, config, inits[cell.init]) for cell in cells}
    methods = {name: get_method(name) for name in config.methods}
    context = TrialContext(config, out, datasets, inits, methods=methods, digests=digests)
    runnable = [c for c in cells if inits[c.init].available]
    pending = [c for c in runnable if read_cell_result(out, c, digests[c.key]) is None]
    print(f"{len(cells)} cells: {len(runnable) - len(pending)} already done, {len(pending)} to run, "
          f"{len(cells) - len(runnable)} unavailable", flush=True)
    errors: dict[str, str] = {}
    if pending:
        context.images = read_dataset_images(datasets)
        init_ray(ray_config or RayConfig())
        name = "grid-" + _digest(sorted(digests[c.key] for c in runnable))[:12]
        errors = _run_tune(pending, context, name)
    trained = [c.key for c in pending if read_cell_result(out, c, digests[c.key]) is not None]

    rows = collect_rows(cells, context, errors)
    frame = results_frame(rows)
    with local_folder(out) as folder:  # pandas and matplotlib write paths; copied when remote
        write_results_csv(frame, folder / RESULTS_CSV)
        plots = _write_report_files(config, frame, cells, rows, inits, folder)
    return DownstreamReport(user_path(out), user_path(out / RESULTS_CSV), user_path(out / RESULTS_MD),
                            [user_path(out / Path(p).relative_to(folder).as_posix()) for p in plots], frame,
                            trained, errors, time.perf_counter() - start)


def _write_report_files(config: DownstreamConfig, frame: pd.DataFrame, cells: Sequence[Cell], rows: list[dict],
                        inits: dict[str, InitWeights], folder: Path) -> list[Path]:
    """results.md and the plots into `folder`; returns the plot paths."""
    meta = {
        "backbone (ours)": inits[INIT_OURS].source if INIT_OURS in inits else "not evaluated",
        "arch": f"{config.train.arch}, input {config.train.image_size[0]}x{config.train.image_size[1]}, "
                f"{config.train.epochs} epochs",
        "ImageNet weights": (inits[INIT_IMAGENET].source if inits[INIT_IMAGENET].available else "unavailable")
                            if INIT_IMAGENET in inits else "not evaluated",
        "seeds": ", ".join(map(str, config.seeds)),
        "cells": f"{len(cells)} ({int((frame['status'] == STATUS_DONE).sum())} done)",
    }
    (folder / RESULTS_MD).write_text(results_markdown(frame, config.methods, config.settings, meta))
    if not config.plots:
        return []
    from eval.downstream.plots import write_plots  # matplotlib only when plotting

    cmc = {cell.key: row["cmc"] for cell, row in zip(cells, rows) if "cmc" in row}
    return write_plots(frame, cmc, folder / "plots")
