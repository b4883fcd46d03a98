"""`python -m core.datasets.synthetic --out DIR --ids N --cameras C --seed S`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from core.datasets.base import DatasetError
from core.datasets.config import SyntheticSpec
from core.datasets.market import load_market1501
from core.datasets.synthetic.dataset import generate_synthetic_dataset


# --------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    defaults = SyntheticSpec()
    parser = argparse.ArgumentParser(
        prog="python -m core.datasets.synthetic",
        description="Generate a procedural person Re-ID dataset in the Market-1501 layout.",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (must be absent or empty)"
    )
    parser.add_argument(
        "--ids", type=int, default=defaults.ids, help="train identities (test gets as many)"
    )
    parser.add_argument(
        "--cameras", type=int, default=defaults.cameras, help="number of cameras (2-9)"
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="random seed; same seed, same bytes"
    )
    parser.add_argument(
        "--images-per-camera", type=int, default=defaults.images_per_camera,
        help="consecutive frames per identity and camera",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, generate, print a one-line summary."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        spec = SyntheticSpec(
            ids=args.ids,
            cameras=args.cameras,
            seed=args.seed,
            images_per_camera=args.images_per_camera,
        )
    except ValidationError as err:
        problems = [
            f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" for e in err.errors()
        ]
        parser.error("; ".join(problems))
    try:
        out = generate_synthetic_dataset(args.out, spec)
    except (FileExistsError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}: {load_market1501(out, source='synthetic').summary()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
