"""`python -m trainers.pretrain --data URI --out URI [--config FILE] [--set pretrain.key=value ...]`

Pre-trains the `pretrain` section of a run preset (default `configs/demo.yaml`) on
`DIR/shards/*.parquet` and writes `CKPT_DIR/backbone.safetensors`, `curves.csv`, `curves.png`
and the checkpoints a rerun with the same `--out` resumes from (see `trainers.pretrain.train`).
"""

from __future__ import annotations

import argparse
import time
from argparse import Namespace
from collections.abc import Sequence

from core.cli import CommandFailed, add_config_options, load_run_config_from, run_command
from core.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainers.pretrain",
        description="Pre-train a timm backbone on the factory's shards with Ray Train (identity classification).",
    )
    parser.add_argument("--data", required=True, metavar="URI",
                        help="factory output location (holds shards/*.parquet): a folder, s3://..., gs://...")
    parser.add_argument("--out", required=True, metavar="URI",
                        help="checkpoint location (folder or s3://, gs://, ...); a rerun with the same one resumes")
    add_config_options(parser, section="pretrain", example="pretrain.epochs=2")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 trained and exported; 1 training failed (resumable); 2 refused before training."""
    args = build_parser().parse_args(argv)
    # Heavy imports (torch, timm, Ray) after argument parsing: `--help` is instant.
    from core.device import ClusterCheckFailed
    from trainers.pretrain.shards import ShardError
    from trainers.pretrain.train import ResumeMismatchError

    # A node that cannot use its GPUs or reach --out (ClusterCheckFailed) is found before training.
    return run_command(lambda: _pretrain(args),
                       refused=(ConfigError, ShardError, ResumeMismatchError, ClusterCheckFailed))


def _pretrain(args: Namespace) -> None:
    from trainers.pretrain.train import prepare_run, pretrain

    config = load_run_config_from(args)[0].pretrain
    summary, plan, latest = prepare_run(args.data, args.out, config)
    print(f"pretrain: {summary.describe()}", flush=True)
    print(f"pretrain: {config.arch} at {config.image_size[0]}x{config.image_size[1]}, {config.epochs} epochs, "
          f"global batch {plan.global_batch} = {plan.num_workers} worker(s) x {plan.accumulation_steps} "
          f"x {plan.micro_batch}", flush=True)
    if latest is not None:
        print(f"pretrain: resuming from {latest}", flush=True)
    import ray.data
    import ray.train

    # One line per epoch (from rank 0) is the progress report; Ray Data's per-operator bars,
    # redrawn by every epoch's pass over the shards, would bury it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    start = time.perf_counter()
    try:
        result = pretrain(args.data, args.out, config)
    except ray.train.TrainingFailedError as err:
        # Workers failed more often than pretrain.max_failures allows: a non-zero exit, with the
        # last checkpoint left in --out for the same command to resume from.
        raise CommandFailed(
            f"pre-training failed after {time.perf_counter() - start:.0f} s: {err}\n"
            f"pretrain: rerun the same command to resume from the last checkpoint in {args.out}") from err
    last = result.history[-1] if result.history else {}
    print(f"pretrain: done in {time.perf_counter() - start:.0f} s; {len(result.history)} epochs, "
          f"final loss {last.get('loss', float('nan')):.4f}, train accuracy {last.get('train_accuracy', 0):.3f}")
    print(f"pretrain: backbone {result.backbone_path}")
    print(f"pretrain: curves {result.curves_csv}, {result.curves_png}")


if __name__ == "__main__":
    raise SystemExit(main())
