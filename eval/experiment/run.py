"""The evidence experiment (`python -m eval.experiment`): its builds (`eval.experiment.builds`), the
pre-training sets and one chain per arm x seed, build -> pre-train -> downstream
(`eval.experiment.chains`), then the report (`eval.experiment.report`, `stats`); the grid's config
is `core.settings.experiment`. Work is shared and resumable at every step: a rerun into the same
OUT trains nothing that is done.
The chains run on the driver's node, where relative local paths mean what they mean here;
everything they write goes to `OUT`, which on a cluster without a shared filesystem is a URI.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from core.config import ConfigError, config_to_yaml
from core.storage import Location, local_folder, resolve, user_path
from core.settings.experiment import ARM_IMAGENET
from core.settings.run import RunConfig
from eval.experiment.builds import (MAIN_BUILD, build_configs, check_builds, ensure_build, measure_consistency,
                                    place_build, refuse_changed_builds, share_filter_models, share_samples)
from eval.experiment.chains import (DONE, Chain, absolute_local_roots, chain_spec, plan_chains, pretraining_sets,
                                    run_chains)
from eval.experiment.scale import plan_scale_runs
from factory.build import FAILED as BUILD_FAILED, REFUSED as BUILD_REFUSED

if TYPE_CHECKING:
    from eval.downstream.inits import InitWeights

RUN_COLUMNS = ("arm", "group", "seed", "dataset", "method", "setting", "status", "mAP", "rank1",
               "pretrain_images", "pretrain_ids", "reason")


class ExperimentFailed(RuntimeError):
    """Some chains failed; everything else is written and a rerun retries only those."""


# What the command maps to exit 2 (refused before heavy work) and exit 1 (failed, resumable).
REFUSED, FAILED = BUILD_REFUSED, (*BUILD_FAILED, ExperimentFailed)


@dataclass
class ExperimentReport:
    out_dir: Path | str
    results_csv: Path | str
    results_md: Path | str
    summary: pd.DataFrame
    runs: pd.DataFrame
    trained: list[str] = field(default_factory=list)  # chains that ran this time
    errors: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def run_experiment(config: RunConfig, out_dir: str | os.PathLike[str] | None = None,
                   log: Callable[[str], None] = print, origin: str = "the config") -> ExperimentReport:
    """The whole experiment into `out_dir` (default `experiment.out_dir`); see the module doc.
    Raises `ExperimentFailed` after writing the report when a chain failed."""
    from factory.build import output_location

    started = time.perf_counter()
    exp = config.experiment
    out = output_location(out_dir or exp.out_dir, config)
    config = absolute_local_roots(config)
    builds = build_configs(config, origin)
    imagenet = check_imagenet_arm(config)
    check_builds(builds, origin, log)
    placed = {name: place_build(name, share_samples(share_filter_models(build, builds[MAIN_BUILD], out),
                                                    builds[MAIN_BUILD], out)
                                if name != MAIN_BUILD and MAIN_BUILD in builds else build, out)
              for name, build in builds.items()}
    refuse_changed_builds(placed)
    (out / "config.yaml").write_text(config_to_yaml(config))

    from core.cluster import init_ray

    # Ray only for work left to do: a rerun of a finished experiment starts nothing.
    build_markers = {name: ensure_build(name, place, log, start_ray=lambda: init_ray(config.ray))
                     for name, place in placed.items()}
    measure_consistency(placed, build_markers, exp.consistency_identities, log)

    from trainers.pretrain.shards import ShardError, inspect_shards

    data, data_digests = pretraining_sets(config, out, build_markers, log)

    chains = plan_chains(config, data)
    sizes, unusable = {}, {}
    for location in {c.data for c in chains if c.data is not None}:
        try:
            sizes[location] = inspect_shards(location)
        except ShardError as err:  # e.g. an ablation whose filter kept nothing: its chains fail, not the run
            unusable[location] = f"no pre-training data: {err}"
    specs = [chain_spec(c, config, out, _start_digest(c, data, data_digests, imagenet)) for c in chains]
    results: dict[str, Any] = {c.key: unusable[c.data] for c in chains if c.data in unusable}
    pending = []
    for spec in specs:
        done = resolve(spec["out"]) / DONE
        if spec["key"] in results:
            log(f"[chain {spec['key']}] not run: {results[spec['key']]}")
        elif done.exists() and done.read_json().get("digest") == spec["digest"]:
            results[spec["key"]] = done.read_json()
        else:
            pending.append(spec)
    without_data = sum(isinstance(result, str) for result in results.values())
    log(f"[experiment] {len(builds)} build(s), {len(chains)} chains: "
        f"{len(chains) - len(pending) - without_data} done before, {len(pending)} to run"
        + (f", {without_data} without data" if without_data else ""))

    def record(spec: dict[str, Any], result: Any) -> None:
        # At once, not at the end: a killed experiment keeps every chain that finished.
        if isinstance(result, dict) and not result["errors"]:
            (resolve(spec["out"]) / DONE).write_json({"digest": spec["digest"], **result})

    if pending:
        init_ray(config.ray)
        results.update(run_chains(pending, exp.concurrency, log, on_done=record))

    runs, errors = _runs_frame(chains, results, sizes, config)
    summary = _write_report(config, out, runs, build_markers, imagenet)
    report = ExperimentReport(user_path(out), user_path(out / "results.csv"), user_path(out / "results.md"), summary,
                              runs, [s["key"] for s in pending], errors, time.perf_counter() - started)
    if errors:
        raise ExperimentFailed(f"{len(errors)} chain(s) failed: " + "; ".join(f"{k}: {v[:200]}" for k, v in errors.items())
                               + f". The report in {out} marks them; rerun the same command to retry them")
    return report


def check_imagenet_arm(config: RunConfig, hf_cache_dir: str | Path | None = None) -> InitWeights | None:
    """With the `imagenet` arm, its init resolved as its chains' downstream runs will resolve it
    (timm's cached or downloadable weights for `downstream.train.arch`, else the
    `downstream.imagenet_standin` file, checked against the arch), before any build or Ray starts:
    a chain would otherwise fine-tune nothing and report every cell unavailable. Returns the init
    without its weights (None without the arm); raises `ConfigError` saying what to set."""
    if ARM_IMAGENET not in config.experiment.arms:
        return None
    from dataclasses import replace

    from eval.downstream.inits import resolve_imagenet
    from trainers.weights import WeightsMismatchError, WeightsUnavailableError

    downstream = config.downstream
    try:
        init = resolve_imagenet(downstream.train.arch, downstream.imagenet_weights, hf_cache_dir,
                                standin=downstream.imagenet_standin)
    except (WeightsMismatchError, WeightsUnavailableError) as err:  # a stand-in that is missing or does not fit
        raise ConfigError(f"experiment.arms has {ARM_IMAGENET!r}, but its init cannot be loaded: {err}") from err
    if not init.available:
        raise ConfigError(
            f"experiment.arms has {ARM_IMAGENET!r}, but timm's ImageNet weights for downstream.train.arch "
            f"{downstream.train.arch!r} cannot be had ({init.reason}) and downstream.imagenet_standin is not set. "
            "Set downstream.imagenet_standin to a backbone file of that arch (`python -m demo --components "
            "imagenet-standin` writes demo/weights/imagenet-standin/backbone.safetensors), put the weights in the "
            "Hugging Face cache, or allow downstream.imagenet_weights: download with HF_HUB_OFFLINE=0")
    return replace(init, state=None)  # the chains load the weights themselves: keep no copy here


def _data_name(chain: Chain, data: Mapping[str, str]) -> str:
    return next((name for name, uri in data.items() if uri == chain.data), "")


def _start_digest(chain: Chain, data: Mapping[str, str], data_digests: Mapping[str, str],
                  imagenet: InitWeights | None) -> str:
    """The digest of what a chain starts from: its pre-training set, or the `imagenet` arm's
    weights (another stand-in file, or timm's real weights turning up, makes it a new chain)."""
    if chain.arm == ARM_IMAGENET and imagenet is not None:
        return imagenet.digest
    return data_digests.get(_data_name(chain, data), "")


def _runs_frame(chains: Sequence[Chain], results: Mapping[str, Any], sizes: Mapping[str, Any],
                config: RunConfig) -> tuple[pd.DataFrame, dict[str, str]]:
    from eval.downstream.cells import plan_cells

    rows, errors = [], {}
    cells = plan_cells(config.downstream.model_copy(update={"inits": ["random"], "seeds": [0]}))
    for chain in chains:
        size = sizes.get(chain.data)
        common = {"arm": chain.arm, "group": chain.group, "seed": chain.seed,
                  "pretrain_images": size.num_rows if size else None, "pretrain_ids": size.num_classes if size else None}
        result = results[chain.key]
        if isinstance(result, str):
            errors[chain.key] = result
            rows += [{**common, "dataset": c.dataset, "method": c.method, "setting": c.setting.name,
                      "status": "error", "reason": result[:300]} for c in cells]
            continue
        for key, error in result["errors"].items():
            errors[f"{chain.key}: {key}"] = error
        rows += [{**common, **{k: v for k, v in row.items() if k != "seed"}} for row in result["rows"]]
    return pd.DataFrame(rows, columns=list(RUN_COLUMNS)), errors


def _write_report(config: RunConfig, out: Location, runs: pd.DataFrame,
                  build_markers: Mapping[str, Any], imagenet: InitWeights | None = None) -> pd.DataFrame:
    from eval.experiment.report import (arm_label, results_markdown, scale_markdown, scale_table, write_plots,
                                        write_scale_plots)
    from eval.experiment.stats import summarize

    exp = config.experiment
    runs["mAP"] = pd.to_numeric(runs["mAP"], errors="coerce")
    runs["rank1"] = pd.to_numeric(runs["rank1"], errors="coerce")
    summary = summarize(runs, exp.baseline)
    consistency = {name: dict(marker) for name, marker in build_markers.items()}
    scale_seeds = f", data scale {exp.data_scale.seeds}" if exp.data_scale else ""
    meta = {"command": "python -m eval.experiment",
            "seeds": f"main arms {exp.seeds}, ablations {exp.ablation_seeds}{scale_seeds}",
            "pre-training": f"{config.pretrain.arch}, {config.pretrain.epochs} epochs",
            "fine-tuning": f"{config.downstream.train.arch}, {config.downstream.train.epochs} epochs",
            "sources": ", ".join(f"{s.source_name} ({s.kind})" for s in config.sources),
            "benchmark": ", ".join(s.source_name for s in config.downstream.datasets),
            "paired differences": f"vs `{exp.baseline}`, per seed; 95 % t interval over seeds"}
    stand_in = imagenet is not None and imagenet.stand_in
    if imagenet is not None:
        from eval.downstream.runner import imagenet_meta  # the downstream report's words for the weights

        meta[f"{arm_label(ARM_IMAGENET)} weights (`{ARM_IMAGENET}` arm)"] = imagenet_meta(imagenet)
    markdown = results_markdown(summary, exp.baseline, meta, consistency, imagenet_stand_in=stand_in)
    scale = scale_table(runs, plan_scale_runs(exp)) if exp.data_scale else None
    if scale is not None:
        markdown += "\n" + scale_markdown(scale, exp.data_scale.seeds)
    with local_folder(out) as folder:
        runs.to_csv(folder / "runs.csv", index=False, float_format="%.2f")
        summary.to_csv(folder / "results.csv", index=False, float_format="%.3f")
        (folder / "results.md").write_text(markdown)
        write_plots(summary, folder / "plots", imagenet_stand_in=stand_in)
        if scale is not None:
            scale.to_csv(folder / "scale.csv", index=False, float_format="%.3f")
            if not scale.empty:
                write_scale_plots(scale, folder / "plots")
    return summary
