"""The evidence experiment's chain: build -> pre-train -> downstream for every arm x seed
(`python -m eval.experiment`; the grid's config, statistics and report are in `eval.experiment`).

Work is shared and resumable at every step:
- one build per distinct build config (`main`, and one per ablation) into `OUT/builds/<name>`,
  skipped when its `experiment.json` holds the same config digest (a build resumes by itself too;
  digests hash locations under OUT relative to it, so a moved experiment folder reuses its work);
- the pre-training sets under `OUT/data/`: the source identities' real images (`source`) and real
  plus generated (`source+<build>`); the generated-only set is the build's own shards;
- one chain per arm x seed, a Ray task (`num_cpus=0`: it coordinates; Ray Train's workers and
  Tune's trials ask for their own CPUs / GPUs) that pre-trains into `OUT/chains/<arm>/seed-<s>/
  pretrain` and fine-tunes into `.../downstream`; a finished chain leaves `done.json` with its
  digest and metrics, and a rerun reads that instead of training.
The chains run on the driver's node, where relative local paths mean what they mean here;
everything they write goes to `OUT`, which on a cluster without a shared filesystem is a URI.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from core.config import ConfigError, apply_overrides, config_to_yaml, validate_config
from core.storage import Location, has_scheme, local_folder, resolve, user_path
from core.settings.experiment import ARM_BOTH, ARM_GENERATED, ARM_RANDOM, ARM_SOURCE
from factory.build import FAILED as BUILD_FAILED, REFUSED as BUILD_REFUSED
from core.settings.run import RunConfig

MAIN_BUILD = "main"
MARKER = "experiment.json"
DONE = "done.json"
CONSISTENCY_KEYS = ("consistency_identities", "fine_tuned", "base_model")  # what a build's marker adds
RUN_COLUMNS = ("arm", "group", "seed", "dataset", "method", "setting", "status", "mAP", "rank1",
               "pretrain_images", "pretrain_ids", "reason")


class ExperimentFailed(RuntimeError):
    """Some chains failed; everything else is written and a rerun retries only those."""


# What the command maps to exit 2 (refused before heavy work) and exit 1 (failed, resumable).
REFUSED, FAILED = BUILD_REFUSED, (*BUILD_FAILED, ExperimentFailed)


def digest(payload: Any, out: Location | None = None) -> str:
    """With `out`, locations under it are hashed relative to it: an experiment folder moved or
    copied elsewhere (another path, another bucket) keeps its digests and reuses its work."""
    text = json.dumps(payload, sort_keys=True, default=str)
    if out is not None:
        text = re.sub(re.escape(out.uri.rstrip("/")) + r'(?=/|")', "$OUT", text)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _build_payload(config: RunConfig) -> dict[str, Any]:
    return config.model_dump(mode="json", exclude={"experiment", "pretrain", "downstream"})


@dataclass(frozen=True)
class Chain:
    """One arm x seed: pre-train on `data` (None: random init), then the downstream grid."""

    arm: str
    group: str  # "main" or "ablation"
    seed: int
    data: str | None = None  # URI of a folder holding shards/

    @property
    def key(self) -> str:
        return f"{self.arm}/seed-{self.seed}"


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


def build_configs(config: RunConfig, origin: str) -> dict[str, RunConfig]:
    """The builds the arms need: `main` (the preset as it is) and one per ablation, validated."""
    exp = config.experiment
    builds = {}
    if {ARM_GENERATED, ARM_BOTH} & set(exp.arms):
        builds[MAIN_BUILD] = config
    base = config.model_dump(mode="json")
    for name, overrides in exp.ablations.items():
        builds[name] = validate_config(RunConfig, apply_overrides(base, overrides),
                                       f"{origin}, experiment.ablations.{name}")
    return builds


def share_filter_models(ablation: RunConfig, main: RunConfig, out: Location) -> RunConfig:
    """An ablation whose Re-ID filter model (the `reid` and `cctf` filters score with it) would be
    trained exactly as the main build's (same sources, same trainer settings) uses the main
    build's model instead of training its own."""
    same = (ablation.filter.kind in ("reid", "cctf") and ablation.filter.reid == main.filter.reid
            and ablation.sources == main.sources and not ablation.filter.reid_checkpoints)
    if not same:
        return ablation
    shared = {s.source_name: (out / "builds" / MAIN_BUILD / "filter_models" / s.source_name).uri for s in main.sources}
    return ablation.model_copy(update={"filter": ablation.filter.model_copy(update={"reid_checkpoints": shared})})


def share_samples(ablation: RunConfig, main: RunConfig, out: Location) -> RunConfig:
    """An ablation that changes only the filter scores the main build's samples again
    (`generation.replay_from`) instead of generating the same images a second time."""
    from factory.preflight import generation_changes

    if generation_changes(ablation, main):
        return ablation
    replay = (out / "builds" / MAIN_BUILD).uri
    return ablation.model_copy(update={"generation": ablation.generation.model_copy(update={"replay_from": replay})})


def check_builds(builds: Mapping[str, RunConfig], origin: str, log: Callable[[str], None]) -> None:
    """The build's check phase for every build, before the first one starts."""
    from factory.build import check_config_and_models

    for name, build in builds.items():
        check_config_and_models(build, origin if name == MAIN_BUILD else f"{origin}, experiment.ablations.{name}", log)


def place_build(name: str, config: RunConfig, out: Location) -> tuple[Location, RunConfig, str]:
    """Where build `name` goes, its config writing there, and the digest of what it makes."""
    location = out / "builds" / name
    config = config.model_copy(update={"output": config.output.model_copy(update={"dir": location.uri})})
    return location, config, digest(_build_payload(config), out)


def refuse_changed_builds(placed: Mapping[str, tuple[Location, RunConfig, str]]) -> None:
    """A build folder started under another config would be resumed over (done identities are
    not redone): refused before any work, naming the folder. A marker of the same config under its
    absolute locations (written before digests were relative to OUT) is rewritten, not refused."""
    for name, (location, config, wanted) in placed.items():
        marker = location / MARKER
        if not marker.exists():
            continue
        found = marker.read_json()
        if found.get("digest") == digest(_build_payload(config)):
            marker.write_json({**found, "digest": wanted})
        elif found.get("digest") != wanted:
            raise ConfigError(
                f"experiment build {name!r}: {location} holds a build of another config (its generation, "
                "caption, filter, sequences or source settings changed); a build resumes rather than redoes "
                "finished identities, so use another --out, or delete that folder to rebuild it")


def ensure_build(name: str, placed: tuple[Location, RunConfig, str], log: Callable[[str], None],
                 start_ray: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Run (or resume, or skip) one build; returns its marker (config digest, counts)."""
    from factory.build import run

    location, config, wanted = placed
    marker = location / MARKER
    done = marker.read_json() if marker.exists() else {}
    if done.get("finished"):
        log(f"[build {name}] done before: {done['kept']} kept of {done['generated']} generated")
        return done
    log(f"[build {name}] {location}")
    marker.write_json({"digest": wanted, "finished": False})  # claims the folder for this config
    start_ray()  # the experiment's own `ray:` settings win over the build's defaults
    summary = run(config, location.uri, log=lambda line: log(f"[build {name}] {line}"))
    done = {"digest": wanted, "finished": True, "generated": summary.total_generated, "kept": summary.total_kept,
            "identities": summary.output_identities, "images": summary.output_images}
    marker.write_json(done)
    return done


def source_table_of(config: RunConfig) -> Any:
    """The real training images of the identities the build plans (all of them, not only the
    sequence each is captioned from), at the build's output size: the source-only control."""
    from factory.build import load_sources
    from factory.sequences import identity_key, plan_identities
    from trainers.pretrain.shards import records_table

    datasets = load_sources(config, log=lambda _: None)
    planned = {seq.key for seq in plan_identities(datasets, config.sequences)}
    records = [r for d in datasets for r in d.train if identity_key(r.source, r.pid) in planned and not r.distractor]
    return records_table(records, config.output.image_size)


def ensure_data(name: str, out: Location, wanted: str, make_table: Callable[[], Any], rows_per_shard: int,
                log: Callable[[str], None]) -> str:
    """`OUT/data/<name>/shards` written once per digest; returns the folder's URI."""
    from trainers.pretrain.shards import write_table_shards

    location = out / "data" / name
    marker = location / MARKER
    if not (marker.exists() and marker.read_json().get("digest") == wanted):
        summary = write_table_shards(make_table(), location, rows_per_shard)
        marker.write_json({"digest": wanted})
        log(f"[data {name}] {summary.describe()}")
    return location.uri


def absolute_local_roots(config: RunConfig) -> RunConfig:
    """Downstream benchmark roots as absolute paths: a chain runs in a Ray worker process, whose
    working directory need not be the driver's."""
    datasets = [d if has_scheme(str(d.root)) else d.model_copy(update={"root": str(Path(d.root).resolve())})
                for d in config.downstream.datasets]
    return config.model_copy(update={"downstream": config.downstream.model_copy(update={"datasets": datasets})})


def chain_spec(chain: Chain, config: RunConfig, out: Location, data_digest: str) -> dict[str, Any]:
    """What one chain's task needs, as plain data, with the digest that says it is done."""
    pretrain = config.pretrain.model_copy(update={"seed": chain.seed}).model_dump(mode="json")
    inits = ["random"] if chain.data is None else ["ours"]
    downstream = config.downstream.model_copy(update={"inits": inits, "seeds": [chain.seed], "plots": False,
                                                      "backbone": None}).model_dump(mode="json")
    location = out / "chains" / chain.arm / f"seed-{chain.seed}"
    return {"key": chain.key, "data": chain.data, "out": location.uri, "pretrain": pretrain,
            "downstream": downstream, "digest": digest([chain.data, data_digest, pretrain, downstream], out)}


def run_chain(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Pre-train (unless random init, or done before under the same digest), then fine-tune and
    evaluate; returns the downstream cells as plain rows. Runs inside a Ray task."""
    from core.settings.downstream import DownstreamConfig
    from eval.downstream.runner import run_downstream
    from core.settings.pretrain import PretrainConfig
    from trainers.checkpoint import BACKBONE_FILE
    from trainers.pretrain.train import pretrain

    out = resolve(spec["out"])
    backbone = None
    if spec["data"] is not None:
        checkpoint = out / "pretrain"
        marker = checkpoint / MARKER
        if not (marker.exists() and marker.read_json().get("digest") == spec["digest"]):
            result = pretrain(spec["data"], checkpoint, PretrainConfig.model_validate(spec["pretrain"]))
            marker.write_json({"digest": spec["digest"], "epochs": len(result.history)})
        backbone = (checkpoint / BACKBONE_FILE).uri
    report = run_downstream(DownstreamConfig.model_validate(spec["downstream"]), backbone=backbone,
                            out_dir=(out / "downstream").uri)
    rows = [{key: _plain(row.get(key)) for key in ("dataset", "method", "setting", "seed", "status", "mAP",
                                                   "rank1", "reason")}
            for row in report.frame.to_dict("records")]
    return {"rows": rows, "errors": report.errors}


def _plain(value: Any) -> Any:
    """pandas' NA / numpy scalars as JSON values."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def run_chains(specs: Sequence[dict[str, Any]], concurrency: int, log: Callable[[str], None],
               on_done: Callable[[dict[str, Any], Any], None] = lambda spec, result: None) -> dict[str, Any]:
    """Run the chains as Ray tasks, `concurrency` at a time, on this node; returns key ->
    result (or the error text for a chain that raised). `on_done` sees each as it finishes."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=here)(run_chain)
    waiting, running, results = list(specs), {}, {}
    started = time.perf_counter()
    while waiting or running:
        while waiting and len(running) < concurrency:
            spec = waiting.pop(0)
            log(f"[chain {spec['key']}] started")
            running[task.remote(spec)] = spec
        ready, _ = ray.wait(list(running), num_returns=1)
        spec = running.pop(ready[0])
        try:
            results[spec["key"]] = ray.get(ready[0])
            log(f"[chain {spec['key']}] finished ({len(results)}/{len(specs)}, "
                f"{time.perf_counter() - started:.0f} s)")
        except Exception as err:  # a failed chain is reported; the others go on
            results[spec["key"]] = f"{type(err).__name__}: {err}"
            log(f"[chain {spec['key']}] FAILED: {str(err).splitlines()[-1][:300]}")
        on_done(spec, results[spec["key"]])
    return results


def plan_chains(config: RunConfig, data: Mapping[str, str]) -> list[Chain]:
    exp = config.experiment
    arm_data = {ARM_RANDOM: None, ARM_SOURCE: data.get(ARM_SOURCE), ARM_GENERATED: data.get(MAIN_BUILD),
                ARM_BOTH: data.get(f"{ARM_SOURCE}+{MAIN_BUILD}")}
    chains = [Chain(arm, "main", seed, arm_data[arm]) for seed in exp.seeds for arm in exp.arms]
    chains += [Chain(name, "ablation", seed, data[name]) for seed in exp.ablation_seeds for name in exp.ablations]
    return chains


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
    if exp.consistency_identities and placed:
        judge = placed[MAIN_BUILD if MAIN_BUILD in placed else next(iter(placed))][0] / "filter_models"
        for name, place in placed.items():
            if place[1].generation.replay_from:  # the main build's very samples: its rates are this build's
                rates = {k: build_markers[MAIN_BUILD][k] for k in CONSISTENCY_KEYS if k in build_markers[MAIN_BUILD]}
                build_markers[name] = {**build_markers[name], **rates, "consistency_source": MAIN_BUILD}
                continue
            build_markers[name] = ensure_consistency(name, place, judge, build_markers[name],
                                                     exp.consistency_identities, log)

    from trainers.pretrain.shards import ShardError, inspect_shards, read_shard_table

    data = {name: (out / "builds" / name).uri for name in builds}
    data_digests = {name: marker["digest"] + str(marker["images"]) for name, marker in build_markers.items()}
    if {ARM_SOURCE, ARM_BOTH} & set(exp.arms):
        source_digest = digest([config.model_dump(mode="json", include={"sources", "sequences"}),
                                list(config.output.image_size)])
        source_rows = functools.cache(lambda: source_table_of(config))  # read once, only if a set is written

        rows_per_shard = config.output.rows_per_shard
        data[ARM_SOURCE] = ensure_data(ARM_SOURCE, out, source_digest, source_rows, rows_per_shard, log)
        data_digests[ARM_SOURCE] = source_digest
        if ARM_BOTH in exp.arms:
            import pyarrow as pa

            name = f"{ARM_SOURCE}+{MAIN_BUILD}"
            data_digests[name] = digest([source_digest, data_digests[MAIN_BUILD]])
            data[name] = ensure_data(
                name, out, data_digests[name],
                lambda: pa.concat_tables([source_rows(), read_shard_table(data[MAIN_BUILD])]), rows_per_shard, log)

    chains = plan_chains(config, data)
    sizes, unusable = {}, {}
    for location in {c.data for c in chains if c.data is not None}:
        try:
            sizes[location] = inspect_shards(location)
        except ShardError as err:  # e.g. an ablation whose filter kept nothing: its chains fail, not the run
            unusable[location] = f"no pre-training data: {err}"
    specs = [chain_spec(c, config, out, data_digests.get(_data_name(c, data), "")) for c in chains]
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
    summary = _write_report(config, out, runs, build_markers)
    report = ExperimentReport(user_path(out), user_path(out / "results.csv"), user_path(out / "results.md"), summary,
                              runs, [s["key"] for s in pending], errors, time.perf_counter() - started)
    if errors:
        raise ExperimentFailed(f"{len(errors)} chain(s) failed: " + "; ".join(f"{k}: {v[:200]}" for k, v in errors.items())
                               + f". The report in {out} marks them; rerun the same command to retry them")
    return report


def _data_name(chain: Chain, data: Mapping[str, str]) -> str:
    return next((name for name, uri in data.items() if uri == chain.data), "")


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
                  build_markers: Mapping[str, Any]) -> pd.DataFrame:
    from eval.experiment.report import results_markdown, write_plots
    from eval.experiment.stats import summarize

    exp = config.experiment
    runs["mAP"] = pd.to_numeric(runs["mAP"], errors="coerce")
    runs["rank1"] = pd.to_numeric(runs["rank1"], errors="coerce")
    summary = summarize(runs, exp.baseline)
    consistency = {name: dict(marker) for name, marker in build_markers.items()}
    meta = {"command": "python -m eval.experiment", "seeds": f"main arms {exp.seeds}, ablations {exp.ablation_seeds}",
            "pre-training": f"{config.pretrain.arch}, {config.pretrain.epochs} epochs",
            "fine-tuning": f"{config.downstream.train.arch}, {config.downstream.train.epochs} epochs",
            "sources": ", ".join(f"{s.source_name} ({s.kind})" for s in config.sources),
            "benchmark": ", ".join(s.source_name for s in config.downstream.datasets),
            "paired differences": f"vs `{exp.baseline}`, per seed; 95 % t interval over seeds"}
    with local_folder(out) as folder:
        runs.to_csv(folder / "runs.csv", index=False, float_format="%.2f")
        summary.to_csv(folder / "results.csv", index=False, float_format="%.3f")
        (folder / "results.md").write_text(results_markdown(summary, exp.baseline, meta, consistency))
        write_plots(summary, folder / "plots")
    return summary


def ensure_consistency(name: str, placed: tuple[Location, RunConfig, str], judge: Location, marker: dict[str, Any],
                       identities: int, log: Callable[[str], None]) -> dict[str, Any]:
    """The build's fine-tuned vs base-model pass rates, scored by the Re-ID models in `judge` (the
    main build's, so every build is judged alike), computed once and kept in its marker. A
    failure here is reported in the table, never the end of the experiment."""
    if marker.get("consistency_identities") == identities:
        return marker
    from eval.experiment.consistency import identity_consistency

    location, config, _ = placed
    try:
        rates = identity_consistency(config, judge, identities)
    except Exception as err:  # noqa: BLE001 - a side measurement: the chains still run
        log(f"[build {name}] identity consistency not measured: {type(err).__name__}: {err}")
        return marker
    marker = {**marker, "consistency_identities": identities, "fine_tuned": rates["fine_tuned"].rate,
              "base_model": rates["base_model"].rate}
    log(f"[build {name}] Re-ID pass rate over {identities} identities: fine-tuned "
        f"{100 * marker['fine_tuned']:.1f} %, base model {100 * marker['base_model']:.1f} %")
    (location / MARKER).write_json(marker)
    return marker
