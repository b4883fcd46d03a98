"""`python -m trainers.pretrain --data URI --out URI [--config FILE] [--set pretrain.key=value ...]`

Pre-trains the `pretrain` section of a run preset (default `configs/demo.yaml`) on
`DIR/shards/*.parquet` and writes `CKPT_DIR/backbone.safetensors`, `curves.csv`, `curves.png`
and the checkpoints a rerun with the same `--out` resumes from (see `trainers.pretrain.train`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from core.config import ConfigError
from core.settings.run import DEFAULT_PRESET, load_run_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainers.pretrain",
        description="Pre-train a timm backbone on the factory's shards with Ray Train (identity classification).",
    )
    parser.add_argument("--data", required=True, metavar="URI",
                        help="factory output location (holds shards/*.parquet): a folder, s3://..., gs://...")
    parser.add_argument("--out", required=True, metavar="URI",
                        help="checkpoint location (folder or s3://, gs://, ...); a rerun with the same one resumes")
    parser.add_argument("--config", type=Path, default=DEFAULT_PRESET,
                        help=f"run preset whose `pretrain:` section is used (default: {DEFAULT_PRESET.name})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. pretrain.epochs=2 (repeatable)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 trained and exported; 1 training failed (resumable); 2 refused before training."""
    args = build_parser().parse_args(argv)
    # Heavy imports (torch, timm, Ray) after argument parsing: `--help` and config errors are instant.
    from trainers.pretrain.shards import ShardError
    from trainers.pretrain.train import ResumeMismatchError, prepare_run, pretrain

    try:
        config = load_run_config(args.config, args.overrides).pretrain
        summary, plan, latest = prepare_run(args.data, args.out, config)
    except (ConfigError, ShardError, ResumeMismatchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"pretrain: {summary.describe()}", flush=True)
    print(f"pretrain: {config.arch} at {config.image_size[0]}x{config.image_size[1]}, {config.epochs} epochs, "
          f"global batch {plan.global_batch} = {plan.num_workers} worker(s) x {plan.accumulation_steps} "
          f"x {plan.micro_batch}", flush=True)
    if latest is not None:
        print(f"pretrain: resuming from {latest}", flush=True)
    import ray.data
    import ray.train

    from core.device import ClusterCheckFailed

    # One line per epoch (from rank 0) is the progress report; Ray Data's per-operator bars,
    # redrawn by every epoch's pass over the shards, would bury it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    start = time.perf_counter()
    try:
        result = pretrain(args.data, args.out, config)
    except ClusterCheckFailed as err:  # a node cannot use its GPUs or reach --out: nothing trained
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ray.train.TrainingFailedError as err:
        # Workers failed more often than pretrain.max_failures allows: a non-zero exit, with the
        # last checkpoint left in --out for the same command to resume from.
        print(f"error: pre-training failed after {time.perf_counter() - start:.0f} s: {err}", file=sys.stderr)
        print(f"pretrain: rerun the same command to resume from the last checkpoint in {args.out}", file=sys.stderr)
        return 1
    last = result.history[-1] if result.history else {}
    print(f"pretrain: done in {time.perf_counter() - start:.0f} s; {len(result.history)} epochs, "
          f"final loss {last.get('loss', float('nan')):.4f}, train accuracy {last.get('train_accuracy', 0):.3f}")
    print(f"pretrain: backbone {result.backbone_path}")
    print(f"pretrain: curves {result.curves_csv}, {result.curves_png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
