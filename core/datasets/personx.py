"""PersonX adapter (Sun & Zheng, CVPR 2019): a synthetic dataset of 1,266 people rendered on six
backgrounds, one Market-layout subset per background.

Layout under `root` (the extracted `PersonX_v1` folder, or the folder holding it)::

    1/{bounding_box_train,query,bounding_box_test}/0001_c1s1_000001_00.jpg   (Market naming)
    2/ ... 6/

`variant` picks one subset (`"1"` .. `"6"`); without it every subset folder present is read
(fast-reid's recipe reads subsets 5 and 6). Names parse with the Market rule (pid 0: distractor,
-1: junk) with cameras c1..c6. The people are the same in every subset, so a pid is kept as it is;
the cameras are not (each subset is another scene), so subset k's camera c is
camid = 6 * (k - 1) + c - 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from core.datasets.base import DatasetError, ImageRecord, ReidDataset, Split, require_dir
from core.datasets.generic import ProblemCollector, assemble, folder_images, make_record, parse_market_name
from core.datasets.market import MARKET_SPLIT_DIRS
from core.datasets.registry import SOURCES, SourceAdapter

if TYPE_CHECKING:
    from core.datasets.config import SourceConfig

PERSONX_SUBSETS = ("1", "2", "3", "4", "5", "6")
PERSONX_TOP_DIR = "PersonX_v1"
CAMERAS_PER_SUBSET = 6


def personx_subsets(root: Path, variant: str | None) -> tuple[Path, list[str]]:
    """The folder holding the subsets, and the subsets to read: `variant`, else all present."""
    if variant is not None and variant not in PERSONX_SUBSETS:
        raise DatasetError(f"{root}: PersonX variant must be one of {list(PERSONX_SUBSETS)}, got {variant!r}")
    wanted = [variant] if variant is not None else list(PERSONX_SUBSETS)
    for base in (root, root / PERSONX_TOP_DIR):
        present = [subset for subset in wanted if (base / subset).is_dir()]
        if present:
            return base, present
    names = " or ".join(f"{subset}/" for subset in wanted)
    raise DatasetError(
        f"{root}: PersonX subset folder not found (expected {names} under it or under {PERSONX_TOP_DIR}/)"
    )


def _personx_record(root: Path, image: Path, subset: int, split: Split, source: str) -> ImageRecord | None:
    pid, camid, sequence, frame = parse_market_name(image)
    if camid >= CAMERAS_PER_SUBSET:
        raise DatasetError(f"{image}: PersonX cameras are c1..c{CAMERAS_PER_SUBSET}, got c{camid + 1}")
    return make_record(
        root, image.relative_to(root), source=source, pid=pid,
        camid=CAMERAS_PER_SUBSET * (subset - 1) + camid, split=split, frame=frame, sequence=sequence,
    )


def _personx_records(
    root: Path, base: Path, subsets: list[str], source: str, problems: ProblemCollector
) -> Iterator[ImageRecord | None]:
    for subset in subsets:
        for split, folder in MARKET_SPLIT_DIRS.items():
            what = f"{source} subset {subset} {split} folder"
            for image in folder_images(root, base / subset / folder, what):
                yield problems.check(_personx_record, root, image, int(subset), split, source)


def load_personx(root: Path, variant: str | None = None, source: str = "personx") -> ReidDataset:
    """Read PersonX subset `variant` (all subsets present when None) from `root`."""
    root = require_dir(Path(root), f"{source} dataset root")
    base, subsets = personx_subsets(root, variant)
    problems = ProblemCollector(source)
    return assemble(problems, root, _personx_records(root, base, subsets, source, problems), base)


@SOURCES.register("personx")
class PersonxSource(SourceAdapter):
    variants = PERSONX_SUBSETS

    def load(self, config: SourceConfig) -> ReidDataset:
        return load_personx(Path(config.root), variant=config.variant, source=config.source_name)
