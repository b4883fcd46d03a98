"""The evidence experiment's chains: one per arm x seed, a Ray task (`num_cpus=0`: it coordinates;
Ray Train's workers and Tune's trials ask for their own CPUs / GPUs) that pre-trains into
`OUT/chains/<arm>/seed-<s>/pretrain` and fine-tunes into `.../downstream`; a finished chain leaves
`done.json` with its digest and metrics, and a rerun reads that instead of training. Their
pre-training sets are under `OUT/data/`: the source identities' real images (`source`), real
plus generated (`source+<build>`) and the data-scale study's shares of the main build
(`scale-images-<P>-seed-<s>`, `scale-ids-<P>-seed-<s>`: `eval.experiment.scale`); the
generated-only set, 100 % of the study included, is the build's own shards.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from core.settings.downstream import INIT_IMAGENET, INIT_OURS, INIT_RANDOM
from core.settings.experiment import ARM_BOTH, ARM_GENERATED, ARM_IMAGENET, ARM_RANDOM, ARM_SOURCE
from core.settings.run import RunConfig
from core.storage import Location, has_scheme, resolve
from eval.experiment.builds import MAIN_BUILD, MARKER, digest
from eval.experiment.scale import SCALE_GROUP, SUBSET_SCHEME, ScaleRun, plan_scale_runs, scale_subset

DONE = "done.json"


@dataclass(frozen=True)
class Chain:
    """One arm x seed: pre-train on `data` (None: no pre-training), then the downstream grid."""

    arm: str
    group: str  # "main", "ablation" or "scale"
    seed: int
    data: str | None = None  # URI of a folder holding shards/

    @property
    def key(self) -> str:
        return f"{self.arm}/seed-{self.seed}"


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


def pretraining_sets(config: RunConfig, out: Location, build_markers: Mapping[str, Any],
                     log: Callable[[str], None]) -> tuple[dict[str, str], dict[str, str]]:
    """The arms' pre-training data, name -> folder URI, and the digest of what each holds: every
    build's own shards, and, when an arm uses them, the source-only set and source + main build."""
    from trainers.pretrain.shards import read_shard_table

    exp = config.experiment
    data = {name: (out / "builds" / name).uri for name in build_markers}
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
    if exp.data_scale is not None:
        scale_data, scale_digests = scale_sets(plan_scale_runs(exp), out, data[MAIN_BUILD], data_digests[MAIN_BUILD],
                                               config.output.rows_per_shard, log)
        data.update(scale_data)
        data_digests.update(scale_digests)
    return data, data_digests


def scale_sets(runs: Sequence[ScaleRun], out: Location, build: str, build_digest: str, rows_per_shard: int,
               log: Callable[[str], None]) -> tuple[dict[str, str], dict[str, str]]:
    """The data-scale study's pre-training sets, name -> folder URI and digest: each point below
    100 % written once under `OUT/data/<name>` from the main build's shards at `build` (a rerun
    whose digest matches writes nothing); 100 % is the build itself and writes nothing. A build
    with no shards leaves the folders unwritten: their chains report "no pre-training data"."""
    from trainers.pretrain.shards import ShardError, read_shard_table

    build_rows = functools.cache(lambda: read_shard_table(build))  # read once, only if a set is written

    def subset_of(run: ScaleRun) -> Any:
        return scale_subset(build_rows(), run.kind, run.percent, run.seed)

    data, data_digests = {}, {}
    for run in runs:
        if run.data_name is None or run.data_name in data:
            continue
        data_digests[run.data_name] = digest([build_digest, run.kind, float(run.percent), run.seed, SUBSET_SCHEME])
        try:
            data[run.data_name] = ensure_data(run.data_name, out, data_digests[run.data_name],
                                              functools.partial(subset_of, run), rows_per_shard, log)
        except ShardError as err:
            log(f"[data {run.data_name}] not written: {err}")
            data[run.data_name] = (out / "data" / run.data_name).uri
    return data, data_digests


def absolute_local_roots(config: RunConfig) -> RunConfig:
    """Downstream benchmark roots as absolute paths: a chain runs in a Ray worker process, whose
    working directory need not be the driver's."""
    datasets = [d if has_scheme(str(d.root)) else d.model_copy(update={"root": str(Path(d.root).resolve())})
                for d in config.downstream.datasets]
    return config.model_copy(update={"downstream": config.downstream.model_copy(update={"datasets": datasets})})


def _absolute_local(uri: str | None) -> str | None:
    return uri if uri is None or has_scheme(uri) else str(Path(uri).expanduser().resolve())


def downstream_init(chain: Chain) -> str:
    """The downstream init a chain fine-tunes from: its own pre-trained backbone (`ours`) when it
    pre-trains, else the reference init its arm stands for (`imagenet`, or `random`)."""
    if chain.data is not None:
        return INIT_OURS
    return INIT_IMAGENET if chain.arm == ARM_IMAGENET else INIT_RANDOM


def chain_spec(chain: Chain, config: RunConfig, out: Location, data_digest: str) -> dict[str, Any]:
    """What one chain's task needs, as plain data, with the digest that says it is done.
    `data_digest` is what the chain starts from: its pre-training set's digest, or for the
    `imagenet` arm the init's weights digest (a new stand-in file makes it a new chain)."""
    pretrain = config.pretrain.model_copy(update={"seed": chain.seed}).model_dump(mode="json")
    init = downstream_init(chain)
    update = {"inits": [init], "seeds": [chain.seed], "plots": False, "backbone": None}
    if init == INIT_IMAGENET:  # read in a Ray worker, whose working directory need not be the driver's
        update["imagenet_standin"] = _absolute_local(config.downstream.imagenet_standin)
    downstream = config.downstream.model_copy(update=update).model_dump(mode="json")
    location = out / "chains" / chain.arm / f"seed-{chain.seed}"
    return {"key": chain.key, "data": chain.data, "out": location.uri, "pretrain": pretrain,
            "downstream": downstream, "digest": digest([chain.data, data_digest, pretrain, downstream], out)}


def run_chain(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Pre-train (unless the arm pre-trains nothing, or done before under the same digest), then
    fine-tune and evaluate; returns the downstream cells as plain rows. Runs inside a Ray task."""
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
    arm_data = {ARM_RANDOM: None, ARM_IMAGENET: None, ARM_SOURCE: data.get(ARM_SOURCE),
                ARM_GENERATED: data.get(MAIN_BUILD), ARM_BOTH: data.get(f"{ARM_SOURCE}+{MAIN_BUILD}")}
    chains = [Chain(arm, "main", seed, arm_data[arm]) for seed in exp.seeds for arm in exp.arms]
    chains += [Chain(name, "ablation", seed, data[name]) for seed in exp.ablation_seeds for name in exp.ablations]
    return chains + scale_chains(plan_scale_runs(exp), data, {c.key for c in chains})


def scale_chains(runs: Sequence[ScaleRun], data: Mapping[str, str], planned: Collection[str] = ()) -> list[Chain]:
    """One chain per arm x seed of the data-scale study, skipping those in `planned` (the
    `generated` arm's, which are the 100 % point); the 100 % point pre-trains on the main build."""
    chains = {}
    for run in runs:
        chain = Chain(run.arm, SCALE_GROUP, run.seed, data[run.data_name or MAIN_BUILD])
        if chain.key not in planned:
            chains.setdefault(chain.key, chain)
    return list(chains.values())
