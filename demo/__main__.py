"""CLI: build the embedded default's demo models.

    python -m demo --out DIR [--minutes N] [--train-source DIR] [--fp16]
                     [--components text-to-image clip captioner imagenet-standin] [--threads N]

With `--minutes` the training steps scale from a fixed calibration (not the clock), so the same
arguments give the same weights. The weights committed with the package were made with

    python -m demo --out demo/weights --fp16

The ImageNet stand-in of the downstream evaluation (`demo.imagenet_standin`) is built on request:

    python -m demo --out demo/weights --components imagenet-standin --threads 1
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from demo.models import BUILDABLE_COMPONENTS, COMPONENTS, DEFAULT_TRAIN_SOURCE, DemoRecipe, build_demo_models


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description=(
            "Train the tiny demo models (Stable Diffusion, BLIP-2, CLIP of the real classes) on "
            "procedural pedestrians and save them with save_pretrained under DIR/text-to-image, "
            "DIR/captioner and DIR/clip; on request, an ImageNet stand-in backbone trained on procedural "
            "objects under DIR/imagenet-standin."
        ),
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (components are replaced)")
    parser.add_argument(
        "--minutes", type=float, default=None,
        help="training length on a 2-core CPU; scales the steps of every phase of the components built "
             "(default: the built-in recipe)",
    )
    parser.add_argument(
        "--train-source", type=Path, default=DEFAULT_TRAIN_SOURCE,
        help="where the procedural training pedestrians are generated (default: %(default)s)",
    )
    parser.add_argument("--fp16", action="store_true", help="save fp16 weights (half the size, for committing)")
    parser.add_argument(
        "--components", nargs="+", choices=BUILDABLE_COMPONENTS, default=list(COMPONENTS),
        help="build only these (the others in OUT are kept); each is trained from the same seed either way "
             "(default: %(default)s; imagenet-standin is built only when named)",
    )
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: torch's choice; 1 is fastest on a machine shared with other jobs)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.minutes is not None and args.minutes <= 0:
        print("error: --minutes must be positive", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    recipe = DemoRecipe() if args.minutes is None else DemoRecipe().scaled(args.minutes, args.components)
    build_demo_models(args.out, args.train_source, recipe, half=args.fp16, components=args.components)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
