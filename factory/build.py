"""`python -m factory.build`: the Diffusion-ReID generation pipeline on Ray Data.

read sources -> identity sequences -> LPE captioning -> DI fine-tune + sample -> filter -> write

With no arguments it runs the embedded default (`configs/demo.yaml`): procedural pedestrians and
tiny models of the real architectures, no GPU, no network. Rerunning into the same `--out`
resumes: identities in the manifest are skipped, nothing is duplicated.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections import Counter
from pathlib import Path

from core.storage import Location, StorageError, has_scheme, resolve
from core.cli import add_config_options, load_run_config_from, run_command
from core.config import ConfigError, config_to_yaml
from core.device import ClusterCheckFailed, DeviceUnusable
from core.datasets.base import DatasetError, ReidDataset
from factory.filters import FILTERS
from factory.models.locate import ModelNotAvailableError
from factory.preflight import check_config, check_models, check_sources, raise_problems
from factory.output.report import BuildSummary, PlanClock, error_class, write_contact_sheet, write_dataset_card
from core.settings.run import RunConfig
from factory.sequences import identity_key, plan_identities, read_sequences
from factory.output.store import OutputStore


# Set by `ray job submit` in the environment of the job's driver process.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"

OUT_OF_MEMORY_HINT = (
    "lower generation.sample_batch_size, generation.vae_batch_size or generation.train_batch_size, or set "
    "generation.mixed_precision=bf16, generation.gradient_checkpointing=true or generation.finetune=lora"
)
# What to change when the circuit breaker trips, by a phrase of the error (else the generic hint).
FAILURE_HINTS: tuple[tuple[str, str], ...] = (
    ("out of memory", OUT_OF_MEMORY_HINT),
    ("divisible by", "generation.resolution must suit the model (see the check phase's rules)"),
    ("debug_fail_identities", "remove the injected failures (generation.debug_fail_identities)"),
)


class BuildAborted(RuntimeError):
    """The build stopped early on a systematic failure; finished work is kept."""


class BuildFailed(RuntimeError):
    """More identities failed than `generation.max_failed_identities` tolerates."""


# What the command maps to exit 2 (refused before heavy work) and exit 1 (failed, resumable).
REFUSED = (ConfigError, DatasetError, ModelNotAvailableError, StorageError, ClusterCheckFailed)
FAILED = (BuildAborted, BuildFailed)


class CircuitBreaker:
    """Trips when the first `limit` identities of a run all fail with the same error class: a
    systematic failure (a bad setting, a broken node image) would otherwise fail every identity
    of a plan that may be days of GPU time. Any success disarms it for the rest of the run."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.classes: list[str] = []
        self.armed = limit > 0

    def record(self, ok: bool, error: str = "", attempts: int = 1) -> str | None:
        """Feed one finished identity; returns the reason to stop, or None."""
        if not ok and error_class(error) == "OutOfMemoryError" and attempts >= 2:
            # Out of memory twice: every identity of this plan will be, on this GPU. Stop at once.
            return f"an identity ran out of GPU memory {attempts} times: {error[:400]}; {OUT_OF_MEMORY_HINT}"
        if ok or not self.armed:  # a success disarms it for the rest of the run
            self.armed = False
            return None
        self.classes.append(error_class(error))
        if len(self.classes) >= self.limit and len(set(self.classes)) == 1:
            hint = next((h for phrase, h in FAILURE_HINTS if phrase in error.lower()),
                        "fix the cause and rerun the same command (finished identities are kept); "
                        "generation.circuit_breaker=0 lets every identity run")
            return (f"the first {self.limit} identities all failed with {self.classes[0]} "
                    f"(last: {error[:300]}); {hint}")
        return None


def run_models(config: RunConfig) -> dict[str, str]:
    """The models the run's actors load: config key -> model id, as the config names them."""
    models = {} if config.generation.replay_from else {"generation.base_model": config.generation.base_model}
    if config.caption.captions == "lpe":
        models["caption.model"] = config.caption.model
    models.update(FILTERS.get(config.filter.kind).run_models(config.filter))
    return models


def resolve_models(config: RunConfig, log=print) -> RunConfig:
    """Make sure every model the run needs is available *before* anything heavy starts: hub ids
    in the cache, local `save_pretrained` folders (the embedded default's are committed under
    `demo/weights/`) or URIs. Nothing is built or installed here, so nothing is logged: `log`
    stays for the callers' signature."""
    from factory.models.locate import check_model_available

    for key, model_id in run_models(config).items():
        check_model_available(model_id, key)
    return config


def check_config_and_models(config: RunConfig, origin: str, log=print) -> None:
    """The check phase's first two steps (the config alone, then the models it names)."""
    raise_problems(check_config(config), origin)
    resolve_models(config, log)
    raise_problems(check_models(config), origin)


def load_sources(config: RunConfig, log=print) -> list[ReidDataset]:
    from core.datasets.registry import load_source

    datasets = []
    for source in config.sources:
        dataset = load_source(source)
        log(f"[read] {dataset.summary()}")
        datasets.append(dataset)
    return datasets


def output_location(out: str | os.PathLike[str] | None, config: RunConfig) -> Location:
    """The build's output URI. Inside `ray job submit` a relative local path would land in the
    job's temporary copy of the working directory and vanish with it: refused."""
    text = os.fspath(out or config.output.dir)
    if os.environ.get(RAY_JOB_ENV) and not has_scheme(text) and not Path(text).expanduser().is_absolute():
        raise ConfigError(
            f"--out {text!r} is relative, and this build runs inside `ray job submit`: it would be written "
            "into the job's temporary working directory and lost. Give a URI (s3://bucket/run, gs://...) "
            "or an absolute path on storage every node shares")
    return resolve(text)


def run(config: RunConfig, out_dir: str | os.PathLike[str] | None = None, log=print,
        origin: str = "the config") -> BuildSummary:
    """Run the whole factory for `config` into `out_dir` (any URI; default `output.dir`);
    returns the summary (also printed and saved).

    The check phase (`factory.preflight`) comes first: every value the models or the data
    cannot take is refused with `PreflightError` before Ray starts, a model loads or anything is
    written. Workers write each finished identity to the output; the driver keeps the manifest.
    Failed identities are recorded and the run goes on; `BuildAborted` ends it early when the
    first identities all fail alike (`generation.circuit_breaker`), after writing what it has.
    `origin` (the preset and overrides) is named in the check phase's errors.
    """
    started = time.perf_counter()
    out = output_location(out_dir, config)
    summary = BuildSummary(out_dir=str(out))

    check_config_and_models(config, origin, log)
    datasets = load_sources(config, log)
    plan = plan_identities(datasets, config.sequences)
    if not plan:
        raise DatasetError("no identities to generate from: the sources have no training identities")
    raise_problems(check_sources(config, datasets, plan, out / "filter_models"), origin)

    # Ray, torch and the stages only now: the check phase above answers in a second or two.
    from core.cluster import check_cluster, cluster_gpus, init_ray
    from factory import ray_pipeline
    from factory.filters.reid_models import ensure_filter_models, finish_filter_models
    from factory.models.shipping import ModelFolders
    from factory.stages.caption import CaptionStage
    from factory.filters import FilterStage
    from factory.stages.generate import GenerationStage
    from factory.stages.replay import ReplayStage
    from factory.stages.base import StageChain
    from factory.output.write import WriteStage

    store = OutputStore(out)
    (out / "config.yaml").write_text(config_to_yaml(config))
    summary.identities_planned = len(plan)
    todo = [seq for seq in plan if seq.key not in store.done]
    summary.identities_skipped_done = len(plan) - len(todo)
    log(f"[plan] {len(plan)} identities, {summary.identities_skipped_done} already done, {len(todo)} to generate")

    t0 = time.perf_counter()
    table, read_report = read_sequences(todo, config.sequences, config.generation.seed)
    summary.add_seconds("read", time.perf_counter() - t0)
    summary.images_quarantined = len(read_report.quarantined)
    summary.identities_skipped_input = len(read_report.skipped_identities)
    if read_report.quarantined or read_report.skipped_identities:
        quarantine = store.write_json("quarantine.json", {"images": read_report.quarantined,
                                                          "identities": read_report.skipped_identities})
        log(f"[read] quarantined {len(read_report.quarantined)} unreadable images -> {quarantine}")

    previews = out / "previews"
    if table.num_rows:
        init_ray(config.ray)  # before the filter model's Ray Train run: the build's settings win
        check_cluster(out, log)  # every node's GPUs and its reach to `out`, in seconds, before any model loads
        # The class itself travels to the filter actors: one a user's module registered exists
        # only in this process's registry.
        image_filter = FILTERS.get(config.filter.kind)
        t0 = time.perf_counter()
        filter_models = (ensure_filter_models(datasets, config.filter, out / "filter_models", log=log)
                         if image_filter.uses_reid_models else {})
        summary.add_seconds("filter_model", time.perf_counter() - t0)

        # Local model folders exist only on this machine unless the cluster shares a filesystem:
        # packed once into the object store, opened by each actor on its own node.
        folders = ModelFolders.ship(run_models(config).values())
        use_gpus = cluster_gpus() > 0
        caption = functools.partial(CaptionStage, config.caption, config.caption.num_gpus, folders)
        if config.generation.replay_from:  # a filter-only variant: that build's samples, scored again
            generate = functools.partial(ReplayStage, config.generation.replay_from)
        else:
            generate = functools.partial(
                GenerationStage, config.generation, config.output, config.generation.num_gpus, 1 if use_gpus else None,
                config.generation.debug_fail_identities, reference_dir=str(out / "reference_sets"), folders=folders)
        filtering = functools.partial(FilterStage, config.filter, filter_models, config.filter.num_gpus, folders,
                                      image_filter)
        wanted = max(0, config.output.contact_sheet_identities - len(previews.files(".png")))
        write = functools.partial(WriteStage, out.uri, frozenset(table.column("identity").to_pylist()[:wanted]))
        filter_then_write = functools.partial(StageChain, filtering, write)
        dataset = ray_pipeline.stage_pipeline(table, (caption, generate, filter_then_write), use_gpus)

        source_images = Counter(identity_key(r.source, r.pid) for d in datasets for r in d.train if not r.distractor)
        breaker = CircuitBreaker(config.generation.circuit_breaker)
        clock = PlanClock(total=len(todo))
        summary.gpus = use_gpus
        rows = ray_pipeline.iter_rows(dataset)
        try:
            for row in rows:
                _record_row(row, store, summary, config, clock, use_gpus, log, source_images.get(row["identity"], 0))
                summary.aborted = breaker.record(row["status"] == "ok", row["error"], row["attempts"])
                if summary.aborted:
                    log(f"[stop] {summary.aborted}")
                    rows.close()  # ends the streaming execution: no more identities start
                    break
        except Exception as err:  # the pool itself failed: write what is finished, then say why
            summary.aborted = actor_pool_failure(err)
            if summary.aborted is None:
                raise
            log(f"[stop] {summary.aborted}")
        if not summary.aborted:  # a stopped build does not wait for models it never used
            finish_filter_models(filter_models, log)

    t0 = time.perf_counter()
    result = store.finalize(config.output.rows_per_shard, seed=config.generation.seed)
    log(f"[shards] {result.images} images of {result.identities} identities in {len(result.shards)} shard(s) "
        f"{'written' if result.rewritten else 'unchanged'} ({time.perf_counter() - t0:.1f} s)")
    summary.output_identities, summary.output_images = result.identities, result.images
    summary.add_dataset_totals(store.manifest)
    write_contact_sheet(out / "contact_sheet.png", previews.files(".png")[: config.output.contact_sheet_identities])
    summary.wall_seconds = time.perf_counter() - started
    write_dataset_card(out / "README.md", config, summary, store.manifest)
    store.write_json("summary.json", summary.as_dict())
    log(summary.render())
    if summary.aborted:
        raise BuildAborted(f"build stopped early: {summary.aborted}")
    raise_if_too_many_failed(summary, config.generation.max_failed_identities, out)
    return summary


def actor_pool_failure(err: BaseException) -> str | None:
    """Why the streaming execution failed, when an actor could not use its GPU (`DeviceUnusable`
    at setup: a node the cluster check did not see, e.g. one the autoscaler added later) or kept
    dying (a sticky CUDA error on every restart: `factory.ray_pipeline.ACTOR_RESTARTS`); None for
    any other error, which the caller re-raises."""
    chain, seen = [], err
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = " | ".join(f"{type(e).__name__}: {e}" for e in chain)
    if any(isinstance(e, DeviceUnusable) for e in chain) or "DeviceUnusable" in text:
        detail = next((str(e) for e in chain if isinstance(e, DeviceUnusable)), text)
        return f"an actor could not use the GPU Ray gave it: {detail[:1200]}"
    if "ActorDiedError" in text or "StickyCudaError" in text:
        return (f"a stage actor died repeatedly (a sticky CUDA error ends an actor; after its restarts the node or "
                f"image is taken as broken): {text[:1200]}; check the nodes' GPUs (`nvidia-smi`, dmesg for Xid)")
    return None


def raise_if_too_many_failed(summary: BuildSummary, tolerated: int, out: Location) -> None:
    """`BuildFailed` (exit 1) when more identities failed this run than `tolerated`, naming them
    by error class; within the tolerance the build counts as done (exit 0)."""
    if summary.identities_failed <= tolerated:
        return
    groups = "; ".join(f"{g['count']} x {name} ({', '.join(g['identities'][:5])}{' ...' if g['count'] > 5 else ''})"
                       for name, g in summary.failures_by_error().items())
    raise BuildFailed(
        f"{summary.identities_failed} identities failed (tolerated: generation.max_failed_identities={tolerated}): "
        f"{groups}. Their errors are in {out / 'summary.json'}; rerun the same command to retry them "
        "(finished identities are kept)")


def identity_cost(row: dict, config: RunConfig, use_gpus: bool) -> tuple[dict[str, float], float]:
    """Seconds per phase of one identity, and its GPU-seconds: each phase's seconds times the
    GPUs its actor holds (0 on a cluster without GPUs)."""
    generation_phases = dict(row["timings"] or ())  # Arrow maps come back as (key, value) pairs
    seconds = {"caption": row["caption_seconds"], **generation_phases, "filter": row["filter_seconds"] or 0.0}
    if not use_gpus:
        return seconds, 0.0
    gpus = {"caption": config.caption.num_gpus, "filter": config.filter.num_gpus}
    return seconds, sum(s * gpus.get(phase, config.generation.num_gpus) for phase, s in seconds.items())


def _record_row(row: dict, store: OutputStore, summary: BuildSummary, config: RunConfig,
                clock: PlanClock, use_gpus: bool, log, source_images: int = 0) -> None:
    """Book one identity's status row (its images are already in staging, written by a worker)."""
    summary.identities_processed += 1
    seconds, gpu_seconds = identity_cost(row, config, use_gpus)
    for phase, value in seconds.items():
        summary.add_seconds(phase, value)
    prefix = f"[{summary.identities_processed}/{clock.total}] {row['identity']}"
    progress = clock.tick()
    if row["status"] != "ok":
        summary.record_failure(row["identity"], row["error"])
        store.record_failure(row["identity"], row["error"], row["attempts"])
        log(f"{prefix}: FAILED after {row['attempts']} attempts: {row['error']} | {progress}")
        return
    summary.add_identity_cost(sum(seconds.values()), gpu_seconds)
    summary.references_reused += bool(row["reference_reused"])
    kept, generated = row["kept_count"], row["generated_count"]
    summary.generated += generated
    summary.kept += kept
    if not kept:
        summary.identities_without_kept.append(row["identity"])
    store.record_identity(row["identity"], {
        "generated": generated, "kept": kept, "source_images": source_images, "caption": row["caption"],
        "seed": row["seed"], "reference_reused": bool(row["reference_reused"]),
        "seconds": {phase: round(value, 3) for phase, value in seconds.items()}, "gpu_seconds": round(gpu_seconds, 3)})
    generated_at = time.strftime("%H:%M:%S", time.localtime(row["generated_at"]))
    log(f"{prefix}: kept {kept}/{generated} ({row['filter_kind']}) in {sum(seconds.values()):.1f} s, generated "
        f"{generated_at} | {progress} | caption: {row['caption']!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m factory.build", description="Generate an identity-consistent synthetic Re-ID dataset "
        "(Diffusion-ReID) on Ray. With no arguments, runs the embedded default (configs/demo.yaml).")
    parser.add_argument("--out", default=None, metavar="URI", help="output location: a local folder, s3://bucket/run, "
                        "gs://bucket/run, ... (default: output.dir of the preset); rerun to resume. Inside `ray job "
                        "submit` give a URI or an absolute shared path")
    add_config_options(parser, example="generation.train_steps=200")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done; 1 identities failed beyond `generation.max_failed_identities`, or
    the build stopped early on a systematic failure (everything finished is written either way);
    2 refused before any heavy work (config, models, data)."""
    args = build_parser().parse_args(argv)

    def build() -> None:
        config, origin = load_run_config_from(args)
        run(config, args.out, origin=origin)

    return run_command(build, refused=REFUSED, failed=FAILED)


if __name__ == "__main__":
    sys.exit(main())
