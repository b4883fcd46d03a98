"""The downstream grid under Ray Tune: one trial per dataset x method x init x setting x seed.

Driver side (`run_downstream`), before any trial starts: validate methods and their options,
load the datasets (generating the procedural benchmark when absent), resolve the three
initialisations (the evaluated backbone is checked against the arch here, so a wrong file fails
with the offending keys named, not in every trial), and build each method once as a dry run.

Each trial fine-tunes one cell with the BoT trainer's pieces (PK sampler, transforms, Adam +
warm-up/step schedule, `run_epoch`, `evaluate_reid`) on the resources Tune gives it (a
GPU when there is one) and writes `cells/<dataset>/<method>/<init>/<setting>/seed<k>/result.json`.

Resume, two layers: a finished cell's `result.json` carries a digest of everything that
determines it (recipe, method options, dataset, weights, setting, seed), and a trial whose cell
already has a result under the same digest reports it without training; and when the Tune
experiment of the same grid exists, it is continued with `Tuner.restore` (unfinished and errored
trials resume, from their last checkpoint when `checkpoint_every` is set). Every trial that
trains appends a line to its cell's `executions.log`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from ray import tune

from core.cluster import RayConfig, check_cluster, cluster_gpus, init_ray
from core.config import ConfigError, config_to_yaml
from core.datasets.base import DatasetError, ReidDataset
from core.datasets.images import read_images
from core.datasets.registry import load_source
from core.storage import local_folder, resolve, user_path
from eval.downstream.cells import (
    CONFIG_FILE,
    Cell,
    RESULTS_CSV,
    RESULTS_MD,
    _digest,
    cell_digest,
    plan_cells,
    read_cell_result,
)
from core.settings.downstream import (
    ADAPTATION,
    GENERALIZATION,
    INIT_IMAGENET,
    INIT_OURS,
    UNSUPERVISED,
    DownstreamConfig,
)
from eval.downstream.inits import InitWeights, load_ours, random_init, resolve_imagenet
from eval.downstream.methods import METHODS
from eval.downstream.tables import (
    METRICS,
    STATUS_DONE,
    STATUS_ERROR,
    STATUS_MISSING,
    STATUS_UNAVAILABLE,
    results_frame,
    results_markdown,
    write_results_csv,
)
from eval.downstream.trial import TrialContext, build_cell_model, run_trial, trial_dirname, trial_name


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
    """The initialisations the grid names; `ours` (and the `imagenet` stand-in, when timm's
    weights are unavailable and `imagenet_standin` is set) is checked against `train.arch` here."""
    inits: dict[str, InitWeights] = {}
    for name in config.inits:
        if name == INIT_OURS:
            if backbone is None:
                raise ConfigError("init 'ours' needs a backbone: pass --backbone FILE (or set downstream.backbone)")
            inits[name] = load_ours(backbone, config.train.arch)
        elif name == INIT_IMAGENET:
            inits[name] = resolve_imagenet(config.train.arch, config.imagenet_weights, hf_cache_dir,
                                           standin=config.imagenet_standin)
        else:
            inits[name] = random_init()
    return inits


def supervised_method_names(config: DownstreamConfig) -> list[str]:
    """Every supervised method the grid trains: its `methods`, the DG methods and, for `da`, the
    source method."""
    kinds = {s.kind for s in config.setting_list}
    names = list(config.methods)
    if GENERALIZATION in kinds and config.generalization is not None:
        names += config.generalization.methods
    if ADAPTATION in kinds:
        names.append(config.adaptation_source_method)
    return list(dict.fromkeys(names))


def check_methods(config: DownstreamConfig) -> None:
    """Unknown methods, bad options or an arch a method cannot use fail here, before Tune."""
    for name in supervised_method_names(config):
        if name not in METHODS:
            raise ConfigError(METHODS.unknown(name))
        method = METHODS.get(name)
        options = method.options(name, config.method_options.get(name))
        try:  # a recipe the method's adjustment makes invalid (pydantic's error is a ValueError too)
            recipe = method.adjust_recipe(config.train, options)
        except ValueError as err:
            raise ConfigError(f"downstream.methods: {name}'s recipe does not fit downstream.train: {err}") from err
        try:
            model, _ = build_cell_model(method, options, recipe, random_init(), num_classes=2, seed=0)
        except ValueError as err:
            raise ConfigError(f"downstream.methods: {name} cannot be built on arch "
                              f"{recipe.arch!r}: {err}") from err
        if name == config.adaptation_source_method and ADAPTATION in {s.kind for s in config.setting_list} \
                and not isinstance(getattr(model, "backbone", None), torch.nn.Module):
            raise ConfigError(f"downstream.adaptation_source_method: {name} has no single backbone to adapt "
                              "(a multi-branch model); use bot, agw or sbs")
    if {s.kind for s in config.setting_list} & {UNSUPERVISED, ADAPTATION}:
        from eval.downstream.unsupervised import UNSUPERVISED_METHODS

        for name in config.unsupervised_methods:
            if name not in UNSUPERVISED_METHODS:
                raise ConfigError(UNSUPERVISED_METHODS.unknown(name))
            UNSUPERVISED_METHODS.get(name).options(name, config.method_options.get(name))


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
    gpus = config.gpus_per_trial if config.gpus_per_trial != "auto" else 1.0 if cluster_gpus() > 0 else 0.0
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context),
                                    {"cpu": config.cpus_per_trial, "gpu": float(gpus)})
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
        _fit(tune.Tuner(
            trainable,
            param_space={"cell": tune.grid_search([cell.params() for cell in left])},
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
        ), errors)
    return errors


# Result fields that stay in result.json only; fractions shown in % like the metrics.
_NOT_IN_ROWS = ("cmc", "history", "digest", "targets")
_PERCENT_EXTRAS = ("before_mAP", "before_rank1", "direct_mAP", "direct_rank1", "source_mAP", "source_rank1")


def collect_rows(
    cells: Sequence[Cell], context: TrialContext, errors: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """One row per cell (per unseen target for a dg cell): its result, or why there is none."""
    rows = []
    for cell in cells:
        result = read_cell_result(context.out_dir, cell, context.digests[cell.key])
        base = {**cell.params(), "kind": cell.setting.kind, "percent": cell.setting.percent}
        if cell.setting.kind == GENERALIZATION and context.config.generalization is not None:
            targets = result["targets"] if result is not None else dict.fromkeys(context.config.generalization.targets)
            rows += [_row({**base, "dataset": target}, result, cell, context, errors, metrics)
                     for target, metrics in targets.items()]
        else:
            rows.append(_row(base, result, cell, context, errors))
    return rows


def _row(base: dict[str, Any], result: dict[str, Any] | None, cell: Cell, context: TrialContext,
         errors: dict[str, str] | None, target_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """A results row from a cell's result (and, for dg, one target's metrics), or its status."""
    if result is not None:
        kept = {k: v for k, v in result.items() if k not in _NOT_IN_ROWS and k != "dataset"}
        if target_metrics is not None:  # dg: the target's mean and spread over its splits
            return {**base, **kept, "splits": target_metrics["splits"],
                    **{k: 100.0 * float(target_metrics[k]) for k in ("mAP", "rank1", "mAP_std", "rank1_std")}}
        return {**base, **kept,
                **{metric: 100.0 * float(result[metric]) for metric in METRICS if metric in result},
                **{key: 100.0 * float(result[key]) for key in _PERCENT_EXTRAS if result.get(key) is not None},
                "cmc": result.get("cmc")}
    init = context.inits[cell.init]
    if not init.available:
        return {**base, "status": STATUS_UNAVAILABLE, "reason": init.reason}
    if errors and cell.key in errors:
        return {**base, "status": STATUS_ERROR, "reason": errors[cell.key]}
    return {**base, "status": STATUS_MISSING, "reason": "not run"}


def load_datasets(config: DownstreamConfig, cells: Sequence[Cell]) -> dict[str, ReidDataset]:
    """The datasets the grid's cells read (a listed dataset no cell uses is not generated or
    read). Every dataset a cell evaluates on its own query/gallery must have them; DG datasets
    are split by their test protocol instead (`core.datasets.test_splits`)."""
    used: dict[str, bool] = {}  # name -> evaluated on its own query/gallery
    for cell in cells:
        for source in config.datasets_of_cell(cell.dataset, cell.setting):
            name = source.source_name
            used[name] = used.get(name, False) or cell.setting.kind != GENERALIZATION
    datasets = {}
    for name, own_split in used.items():
        dataset = datasets[name] = load_source(config.source_config(name))
        if own_split and (not dataset.query or not dataset.gallery):
            raise ConfigError(f"downstream.datasets: {name} has no query/gallery split to evaluate on "
                              "(small datasets such as VIPeR or PRID are split at random in the dg setting only)")
        print(dataset.summary(), flush=True)
    return datasets


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
    unknown = sorted(set(config.debug_fail_cells) - {c.key for c in plan_cells(config)})
    if unknown:
        raise ConfigError(f"downstream.debug_fail_cells: {unknown} are not cells of this grid")
    inits = resolve_inits(config, config.backbone, hf_cache_dir)
    cells = plan_cells(config)
    datasets = load_datasets(config, cells)
    for init in inits.values():
        if not init.available:
            print(f"{init.name} weights unavailable, cells reported as such: {init.reason}", flush=True)
        elif init.stand_in:
            print(f"{init.name} weights unavailable ({init.reason}); its cells train from the {init.source}",
                  flush=True)
    (out / CONFIG_FILE).write_text(config_to_yaml(config))

    if any(s.kind in ("fs", "ss") for s in config.setting_list) and not any(c.setting.kind in ("fs", "ss")
                                                                            for c in cells):
        print("note: fraction_datasets / fraction_methods leave no Fs/Ss cell to run", flush=True)
    digests = {cell.key: cell_digest(cell, config, inits[cell.init]) for cell in cells}
    methods = {name: METHODS.get(name) for name in supervised_method_names(config)}
    context = TrialContext(config, out, datasets, inits, methods=methods, digests=digests)
    runnable = [c for c in cells if inits[c.init].available]
    pending = [c for c in runnable if read_cell_result(out, c, digests[c.key]) is None]
    print(f"{len(cells)} cells: {len(runnable) - len(pending)} already done, {len(pending)} to run, "
          f"{len(cells) - len(runnable)} unavailable", flush=True)
    errors: dict[str, str] = {}
    if pending:
        context.images = read_dataset_images(datasets)
        init_ray(ray_config or RayConfig())
        check_cluster(out)  # every node's GPUs and its reach to `out`, before any trial starts
        name = "grid-" + _digest(sorted(digests[c.key] for c in runnable))[:12]
        errors = _run_tune(pending, context, name)
    trained = [c.key for c in pending if read_cell_result(out, c, digests[c.key]) is not None]

    rows = collect_rows(cells, context, errors)
    done_cells = len(runnable) - len(pending) + len(trained)
    frame = results_frame(rows)
    with local_folder(out) as folder:  # pandas and matplotlib write paths; copied when remote
        write_results_csv(frame, folder / RESULTS_CSV)
        plots = _write_report_files(config, frame, cells, rows, inits, folder, done_cells)
    return DownstreamReport(user_path(out), user_path(out / RESULTS_CSV), user_path(out / RESULTS_MD),
                            [user_path(out / Path(p).relative_to(folder).as_posix()) for p in plots], frame,
                            trained, errors, time.perf_counter() - start)


def imagenet_meta(init: InitWeights) -> str:
    if not init.available:
        return "unavailable"
    if init.stand_in:
        return f"{init.source} (in place of timm's ImageNet weights, unavailable here)"
    return init.source


def _write_report_files(config: DownstreamConfig, frame: pd.DataFrame, cells: Sequence[Cell], rows: list[dict],
                        inits: dict[str, InitWeights], folder: Path, done_cells: int) -> list[Path]:
    """results.md and the plots into `folder`; returns the plot paths."""
    meta = {
        "backbone (ours)": inits[INIT_OURS].source if INIT_OURS in inits else "not evaluated",
        "arch": f"{config.train.arch}, input {config.train.image_size[0]}x{config.train.image_size[1]}, "
                f"{config.train.epochs} epochs",
        "ImageNet weights": imagenet_meta(inits[INIT_IMAGENET]) if INIT_IMAGENET in inits else "not evaluated",
        "seeds": ", ".join(map(str, config.seeds)),
        "cells": f"{len(cells)} ({done_cells} done)",  # by cell, not by row: a dg cell has a row per target
    }
    (folder / RESULTS_MD).write_text(results_markdown(frame, config.methods, config.settings, meta))
    if not config.plots:
        return []
    from eval.downstream.plots import write_plots  # matplotlib only when plotting

    cmc = {Cell.from_params(row).key: row["cmc"] for row in rows if row.get("cmc")}
    return write_plots(frame, cmc, folder / "plots")
