"""`python -m eval.downstream --backbone URI [--config FILE] [--out URI] [--set key.path=value ...]`

Fine-tunes every cell of the preset's `downstream:` grid under Ray Tune and writes
`DIR/results.csv`, `DIR/results.md` and `DIR/plots/` (see `eval.downstream.runner`). Rerunning
into the same DIR continues an interrupted evaluation without redoing finished cells.
"""

from __future__ import annotations

import argparse
import sys
from argparse import Namespace
from collections.abc import Sequence

from core.cli import add_config_options, load_run_config_from, run_command
from core.storage import resolve
from core.config import ConfigError
from core.device import ClusterCheckFailed
from core.datasets.base import DatasetError
from trainers.weights import WeightsMismatchError, WeightsUnavailableError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.downstream",
        description="Downstream Re-ID evaluation (mAP/Rank-1 tables of ours vs ImageNet vs random) under Ray Tune.",
    )
    parser.add_argument("--backbone", metavar="URI",
                        help="backbone .safetensors to evaluate as 'ours' (e.g. trainers.pretrain's "
                        "CKPT_DIR/backbone.safetensors), a path or s3://, gs://, ...; default: downstream.backbone")
    parser.add_argument("--out", metavar="URI", help="output folder or s3://, gs://, ... (default: downstream.out_dir)")
    add_config_options(parser, section="downstream", example="downstream.train.epochs=4")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 every cell done; 1 a cell failed (the others are written, a rerun retries it);
    2 refused before Ray starts (config, data, backbone weights, cluster)."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: _evaluate(args), refused=(
        ConfigError, DatasetError, WeightsMismatchError, WeightsUnavailableError, ClusterCheckFailed))


def _evaluate(args: Namespace) -> int:
    run_config, _ = load_run_config_from(args)
    from eval.downstream.runner import run_downstream  # Ray and torch only once the config is valid

    report = run_downstream(run_config.downstream, backbone=args.backbone, out_dir=args.out,
                            ray_config=run_config.ray)
    print(resolve(report.results_md).read_text())
    print(f"wrote {report.results_csv}, {report.results_md} and {len(report.plots)} plots in "
          f"{report.seconds:.0f} s ({len(report.trained)} cells trained now)")
    for key, error in report.errors.items():
        print(f"error in {key}: {error}", file=sys.stderr)
    return 1 if report.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
