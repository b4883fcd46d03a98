"""`python -m trainers.reid --source-root URI [--source-kind KIND] [--config FILE] [--set k=v ...] --out URI`

Trains the BoT baseline on one source dataset and prints mAP / Rank-1 of the untrained and the
trained model (see `trainers.reid.baseline.run_bot_baseline`).
"""

from __future__ import annotations

import argparse
from argparse import Namespace
from collections.abc import Sequence

from core.cli import add_config_options, run_command
from core.storage import StorageError
from core.config import ConfigError, load_config
from core.datasets.base import DatasetError
from core.datasets.config import SourceConfig
from core.datasets.registry import SOURCES, load_source
from core.settings.reid import ReidTrainConfig
from trainers.reid.baseline import run_bot_baseline


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainers.reid", description="Train and evaluate the BoT Re-ID baseline with Ray Train."
    )
    parser.add_argument("--source-root", required=True, metavar="URI",
                        help="dataset folder: a local path or s3://, gs://, ... (fetched once into the local cache)")
    parser.add_argument("--source-kind", default="market1501", choices=SOURCES.names(),
                        help="dataset layout (default: market1501, which also reads the synthetic one)")
    parser.add_argument("--out", required=True, metavar="URI", help="output folder or s3://, gs://, ...")
    # Its own preset (a ReidTrainConfig), not a run preset's section.
    add_config_options(parser, example="epochs=4", default="the BoT defaults; configs/reid_demo.yaml is the CPU demo")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _train(args), refused=(ConfigError, DatasetError, StorageError))


def _train(args: Namespace) -> None:
    config = load_config(ReidTrainConfig, args.config, args.overrides)
    dataset = load_source(SourceConfig(kind=args.source_kind, root=args.source_root))
    print(dataset.summary(), flush=True)
    report = run_bot_baseline(dataset, config, args.out)
    print(report.summary())


if __name__ == "__main__":
    raise SystemExit(main())
