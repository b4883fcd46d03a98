"""`python -m factory.build`: the Diffusion-ReID generation pipeline on Ray Data.

read sources -> identity sequences -> LPE captioning -> DI fine-tune + sample -> filter -> write

With no arguments it runs the embedded default (`configs/demo.yaml`): procedural pedestrians and
tiny models of the real architectures, no GPU, no network. Rerunning into the same `--out`
resumes: identities in the manifest are skipped, nothing is duplicated.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import pyarrow as pa

from factory.config import ConfigError, save_config
from factory.datasets.base import DatasetError, ReidDataset
from factory.report import BuildSummary, identity_strip, write_contact_sheet, write_dataset_card
from factory.run_config import RunConfig, load_run_config
from factory.schema import STAGED_SCHEMA
from factory.sequences import plan_identities, read_sequences
from factory.store import OutputStore, safe_file_stem


def resolve_models(config: RunConfig, log=print) -> RunConfig:
    """Make sure every model the run needs is available *before* anything heavy starts:
    bootstrap the embedded default's tiny models, or check hub ids / local paths exist."""
    from factory.models.loading import check_model_available

    if config.demo_models.enabled:
        from factory.models.demo import ensure_demo_models

        ensure_demo_models(config.demo_models, log=log)
    check_model_available(config.generation.base_model, "generation.base_model")
    check_model_available(config.caption.model, "caption.model")
    if config.filter.kind == "clip":
        check_model_available(config.filter.clip_model, "filter.clip_model")
    return config


def load_sources(config: RunConfig, log=print) -> list[ReidDataset]:
    from factory.datasets.registry import load_source

    datasets = []
    for source in config.sources:
        dataset = load_source(source)
        log(f"[read] {dataset.summary()}")
        datasets.append(dataset)
    return datasets


def staged_rows(row: dict) -> pa.Table:
    """Explode one filtered identity row into one staged row per generated image."""
    n = len(row["generated"])
    return pa.table(
        {
            "image": [{"bytes": b, "path": f"{safe_file_stem(row['identity'])}_{i:04d}.jpg"} for i, b in enumerate(row["generated"])],
            "source": [row["source"]] * n,
            "source_pid": [row["source_pid"]] * n,
            "identity": [row["identity"]] * n,
            "prompt": row["sample_prompts"],
            "seed": row["sample_seeds"],
            "score": row["scores"],
            "index": list(range(n)),
            "kept": row["kept"],
        },
        schema=STAGED_SCHEMA,
    )


def run(config: RunConfig, out_dir: Path | None = None, log=print) -> BuildSummary:
    """Run the whole factory for `config`; returns the summary (also printed and saved)."""
    from factory import ray_pipeline
    from factory.filter_models import ensure_filter_models
    from factory.stages.caption import CaptionStage
    from factory.stages.filter import FilterStage
    from factory.stages.generate import GenerationStage

    started = time.perf_counter()
    out_dir = Path(out_dir or config.output.dir).resolve()  # absolute: records under it are compared by path
    summary = BuildSummary(out_dir=str(out_dir))

    resolve_models(config, log)
    datasets = load_sources(config, log)
    store = OutputStore(out_dir)
    save_config(config, out_dir / "config.yaml")

    plan = plan_identities(datasets, config.sequences)
    if not plan:
        raise DatasetError("no identities to generate from: the sources have no training identities")
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
        store.write_json("quarantine.json", {"images": read_report.quarantined, "identities": read_report.skipped_identities})
        log(f"[read] quarantined {len(read_report.quarantined)} unreadable images -> {out_dir / 'quarantine.json'}")

    if table.num_rows:
        ray_pipeline.init_ray(config.ray)  # before the filter model's Ray Train run: the build's settings win
        t0 = time.perf_counter()
        filter_models = ensure_filter_models(datasets, config.filter, out_dir / "filter_models", log=log)
        summary.add_seconds("filter_model", time.perf_counter() - t0)

        use_gpus = ray_pipeline.cluster_gpus() > 0
        threads = 1 if use_gpus else None
        caption = functools.partial(CaptionStage, config.caption, config.caption.num_gpus)
        generate = functools.partial(
            GenerationStage,
            config.generation,
            config.output,
            config.caption.iir_token,
            config.generation.num_gpus,
            threads,
            config.generation.debug_fail_identities,
        )
        filtering = functools.partial(FilterStage, config.filter, filter_models, config.filter.num_gpus)
        dataset = ray_pipeline.dataset_of_rows(table)
        for make_stage in (caption, generate, filtering):
            dataset = ray_pipeline.apply_stage(dataset, make_stage, use_gpus)

        previews = out_dir / "previews"
        previews.mkdir(exist_ok=True)
        for row in ray_pipeline.iter_rows(dataset):
            _record_row(row, store, summary, previews, config, len(todo), log)

    result = store.finalize(config.output.rows_per_shard)
    summary.output_identities, summary.output_images = result.identities, result.images
    strips = sorted(previews.glob("*.png"))[: config.output.contact_sheet_identities] if (previews := out_dir / "previews").exists() else []
    write_contact_sheet(out_dir / "contact_sheet.png", strips)
    summary.wall_seconds = time.perf_counter() - started
    write_dataset_card(out_dir / "README.md", config, summary, store.manifest)
    store.write_json("summary.json", summary.as_dict())
    log(summary.render())
    return summary


def _record_row(row: dict, store: OutputStore, summary: BuildSummary, previews: Path, config: RunConfig, total: int, log) -> None:
    summary.identities_processed += 1
    summary.add_seconds("caption", row["caption_seconds"])
    summary.add_seconds("filter", row["filter_seconds"] or 0.0)
    for phase, seconds in json.loads(row["timings"] or "{}").items():
        summary.add_seconds(phase, seconds)
    prefix = f"[{summary.identities_processed}/{total}] {row['identity']}"
    if row["status"] != "ok":
        summary.identities_failed += 1
        store.record_failure(row["identity"], row["error"], row["attempts"])
        log(f"{prefix}: FAILED after {row['attempts']} attempts: {row['error']}")
        return
    kept = sum(row["kept"])
    generated = len(row["generated"])
    summary.generated += generated
    summary.kept += kept
    store.record_identity(
        row["identity"],
        staged_rows(row),
        {"generated": generated, "kept": kept, "caption": row["caption"], "seed": row["seed"]},
    )
    if len(list(previews.glob("*.png"))) < config.output.contact_sheet_identities:
        # Written aside then renamed: a kill mid-write must not leave a truncated PNG that the
        # next run's contact sheet would choke on (the ".tmp" name escapes the "*.png" glob).
        path = previews / f"{safe_file_stem(row['identity'])}.png"
        tmp = previews / f".{path.name}.tmp"
        identity_strip(row).save(tmp, format="PNG")
        os.replace(tmp, path)
    log(f"{prefix}: kept {kept}/{generated} ({row['filter_kind']}), caption: {row['caption']!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m factory.build",
        description="Generate an identity-consistent synthetic Re-ID dataset (Diffusion-ReID) on Ray. "
        "With no arguments, runs the embedded default (configs/demo.yaml).",
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML preset (default: configs/demo.yaml)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: output.dir of the preset); rerun to resume")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override a config value, e.g. --set generation.train_steps=200 (repeatable)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_run_config(args.config, args.overrides)
        run(config, args.out)
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from factory.models.loading import ModelNotAvailableError

        if isinstance(err, ModelNotAvailableError):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
