"""`python -m core.datasets.synthetic --out DIR --ids N --cameras C --seed S --domain D [--identity-traits]`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from core.cli import run_command
from core.datasets.base import DatasetError
from core.datasets.config import SyntheticSpec
from core.datasets.market import load_market1501
from core.datasets.synthetic.dataset import generate_synthetic_dataset
from core.datasets.synthetic.domains import DOMAINS


def build_parser() -> argparse.ArgumentParser:
    defaults = SyntheticSpec()
    parser = argparse.ArgumentParser(
        prog="python -m core.datasets.synthetic",
        description="Generate a procedural person Re-ID dataset in the Market-1501 layout.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (must be absent or empty)")
    for field, help_text in (
        ("ids", "train identities (test gets as many)"),
        ("cameras", "number of cameras (2-9)"),
        ("seed", "random seed; same seed, same bytes"),
        ("images_per_camera", "consecutive frames per identity and camera"),
    ):
        flag = "--" + field.replace("_", "-")
        parser.add_argument(flag, type=int, default=getattr(defaults, field), help=help_text)
    domains = "; ".join(
        f"{name}: {domain.description} ({domain.suggested_cameras} cameras suggested)" for name, domain in DOMAINS.items()
    )
    parser.add_argument(
        "--domain", choices=DOMAINS.names(), default=defaults.domain,
        help=f"capture conditions; the identities stay the same (default %(default)s). {domains}",
    )
    parser.add_argument(
        "--identity-traits", action="store_true",
        help="give every identity traits no caption names (a print on its top, body proportions, a fine texture "
        "on its lower garment), the same in every camera, written per pid to traits.jsonl; the words stay as "
        "without them (default: off, the world as it was)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        spec = SyntheticSpec(**{k: v for k, v in vars(args).items() if k != "out"})
    except ValidationError as err:
        problems = [f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" for e in err.errors()]
        parser.error("; ".join(problems))
    return run_command(lambda: _generate(args.out, spec), failed=(FileExistsError, DatasetError))


def _generate(out: Path, spec: SyntheticSpec) -> None:
    written = generate_synthetic_dataset(out, spec)
    print(f"wrote {written}: {load_market1501(written, source='synthetic').summary()}")


if __name__ == "__main__":
    raise SystemExit(main())
