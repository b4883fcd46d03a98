"""CUHK02 adapter (Li & Wang, CVPR 2013): 1,816 people seen by five camera pairs.

Layout under `root` (the `Dataset` folder of the release, or the folder holding it)::

    P1/cam1/NNN_<...>.png  P1/cam2/NNN_<...>.png     971 people (overlaps CUHK01)
    P2/ ... P5/ (cam1/, cam2/ each)                   306, 107, 193 and 239 people

A name starts with the person's number within its pair and an underscore, as torchreid and
fast-reid parse it (`NNN_...png`; the rest is not used). Each pair has its own numbering, so pid = 1000 * pair + NNN
(P2's person 17 is pid 2017; the pair's number in the pid also keeps pid 0, a distractor, out).
Camera: camid = 2 * (pair - 1) + (cam - 1), i.e. P1 cam1 is 0, P1 cam2 is 1, ... P5 cam2 is 9.

`variant`:
- `all` (default): every image is a training image, as fast-reid's DG recipes use CUHK02 (a
  source only; its adapter has no test protocol).
- `p5-test`: torchreid's protocol, P1-P4 for training, P5 cam1 the query and P5 cam2 the gallery.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from core.datasets.base import DatasetError, ImageRecord, ReidDataset, Split
from core.datasets.generic import ProblemCollector, folder_images, load_layout, make_record
from core.datasets.registry import SOURCES, SourceAdapter

if TYPE_CHECKING:
    from core.datasets.config import SourceConfig

CUHK02_PAIRS = (1, 2, 3, 4, 5)  # folders P1..P5
CUHK02_CAMERAS = (1, 2)  # folders cam1, cam2
CUHK02_VARIANTS = ("all", "p5-test")
CUHK02_TEST_PAIR = 5  # of the p5-test variant
PIDS_PER_PAIR = 1000  # a pair's numbers have at most three digits
CUHK02_NAME = re.compile(r"(?P<number>\d+)_[^/]*")


def _cuhk02_base(root: Path) -> Path:
    for base in (root, root / "Dataset"):
        if (base / "P1").is_dir():
            return base
    raise DatasetError(f"{root}: CUHK02 folder not found (expected P1/ ... P5/ under it or under Dataset/)")


def _split_of(pair: int, cam: int, variant: str) -> Split:
    if variant == "p5-test" and pair == CUHK02_TEST_PAIR:
        return "query" if cam == 1 else "gallery"
    return "train"


def _cuhk02_record(root: Path, image: Path, pair: int, cam: int, split: Split, source: str) -> ImageRecord | None:
    match = CUHK02_NAME.fullmatch(image.name)
    if match is None:
        raise DatasetError(f"{image}: file name does not match CUHK02 naming 'NNN_....png'")
    number = int(match["number"])
    if number >= PIDS_PER_PAIR:
        raise DatasetError(f"{image}: person number {number} has more than three digits")
    return make_record(
        root, image.relative_to(root), source=source, pid=PIDS_PER_PAIR * pair + number,
        camid=2 * (pair - 1) + (cam - 1), split=split,
    )


def _cuhk02_records(
    root: Path, base: Path, source: str, problems: ProblemCollector, *, variant: str
) -> Iterator[ImageRecord | None]:
    for pair in CUHK02_PAIRS:
        for cam in CUHK02_CAMERAS:
            images = folder_images(root, base / f"P{pair}" / f"cam{cam}", f"{source} camera folder")
            split = _split_of(pair, cam, variant)
            for image in images:
                yield problems.check(_cuhk02_record, root, image, pair, cam, split, source)


def load_cuhk02(root: Path, variant: str | None = None, source: str = "cuhk02") -> ReidDataset:
    """Read CUHK02 from `root`: every image in `train` (`variant` None or `all`), or torchreid's
    P5-as-test protocol (`p5-test`)."""
    chosen = variant or "all"
    if chosen not in CUHK02_VARIANTS:
        raise DatasetError(f"{root}: CUHK02 variant must be one of {list(CUHK02_VARIANTS)}, got {variant!r}")
    return load_layout(root, source, _cuhk02_base, partial(_cuhk02_records, variant=chosen))


@SOURCES.register("cuhk02")
class Cuhk02Source(SourceAdapter):
    variants = CUHK02_VARIANTS

    def load(self, config: SourceConfig) -> ReidDataset:
        return load_cuhk02(Path(config.root), variant=config.variant, source=config.source_name)
