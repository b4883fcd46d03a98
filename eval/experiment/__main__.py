"""`python -m eval.experiment [--config FILE] [--out URI] [--set key.path=value ...]`

Runs the preset's `experiment:` grid (default `configs/demo.yaml`; the measured one is
`configs/evidence.yaml`): builds, pre-training sets, then one chain per arm x seed (pre-train,
fine-tune, evaluate), and writes `OUT/results.md`, `results.csv`, `runs.csv` and `plots/`.
Rerunning into the same OUT trains nothing that is done.
"""

from __future__ import annotations

import argparse
from argparse import Namespace
from collections.abc import Sequence

from core.cli import add_config_options, load_run_config_from, run_command
from core.storage import resolve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.experiment",
        description="Does pre-training on generated images help? Arms (random / imagenet / source-only / generated / "
        "source+generated, and factory ablations) x seeds, each built, pre-trained and fine-tuned on Ray.",
    )
    parser.add_argument("--out", metavar="URI", help="output folder or s3://, gs://, ... (default: experiment.out_dir); "
                        "a rerun into the same one resumes")
    add_config_options(parser, section="experiment", example="experiment.seeds=[0]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 every chain done; 1 a build or chain failed (the report marks it; a rerun
    retries it); 2 refused before any heavy work (config, models, data)."""
    args = build_parser().parse_args(argv)
    from eval.experiment.run import FAILED, REFUSED

    return run_command(lambda: _experiment(args), refused=REFUSED, failed=FAILED)


def _experiment(args: Namespace) -> None:
    from eval.experiment.run import run_experiment

    config, origin = load_run_config_from(args)
    report = run_experiment(config, args.out, origin=origin)
    print(resolve(report.results_md).read_text())
    print(f"wrote {report.results_md}, {report.results_csv} in {report.seconds:.0f} s "
          f"({len(report.trained)} chains run now)")


if __name__ == "__main__":
    raise SystemExit(main())
