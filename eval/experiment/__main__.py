"""`python -m eval.experiment [--config FILE] [--out URI] [--set key.path=value ...]`

Runs the preset's `experiment:` grid (default `configs/demo.yaml`; the measured one is
`configs/evidence.yaml`): builds, pre-training sets, then one chain per arm x seed (pre-train,
fine-tune, evaluate), and writes `OUT/results.md`, `results.csv`, `runs.csv` and `plots/`.
Rerunning into the same OUT trains nothing that is done.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from core.config import config_origin
from core.storage import resolve
from core.settings.run import DEFAULT_PRESET, load_run_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.experiment",
        description="Does pre-training on generated images help? Arms (random / source-only / generated / "
        "source+generated, and factory ablations) x seeds, each built, pre-trained and fine-tuned on Ray.",
    )
    parser.add_argument("--config", type=Path, default=None,
                        help=f"run preset with an experiment: section (default: {DEFAULT_PRESET.name})")
    parser.add_argument("--out", metavar="URI", help="output folder or s3://, gs://, ... (default: experiment.out_dir); "
                        "a rerun into the same one resumes")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset value, e.g. experiment.seeds=[0] (repeatable)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 every chain done; 1 a build or chain failed (the report marks it; a rerun
    retries it); 2 refused before any heavy work (config, models, data)."""
    args = build_parser().parse_args(argv)
    from eval.experiment.run import FAILED, REFUSED, run_experiment

    try:
        config = load_run_config(args.config, args.overrides)
        report = run_experiment(config, args.out, origin=config_origin(args.config or DEFAULT_PRESET, args.overrides))
    except REFUSED + FAILED as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, REFUSED) else 1
    print(resolve(report.results_md).read_text())
    print(f"wrote {report.results_md}, {report.results_csv} in {report.seconds:.0f} s "
          f"({len(report.trained)} chains run now)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
