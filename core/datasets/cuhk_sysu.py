"""CUHK-SYSU person crops adapter (Xiao et al., person search), as fast-reid and torchreid read them.

Layout under `root` (the folder holding `cropped_images/`, or `cropped_images` itself)::

    cropped_images/p11422_s16929_1.jpg     pPID_sSCENE[_N].jpg: one labelled person in one scene image

`cropped_images/` is what fast-reid and torchreid expect: crops cut from the person-search
release's scene images with its annotations, prepared beforehand (not read here). The person
number is the pid; there is no camera (street snaps and movie frames), so every image is camid 0.
All images are training images (CUHK-SYSU is a training source only); pid 0, should it occur, is
a person like any other, not a distractor.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from core.datasets.base import DatasetError, ImageRecord, ReidDataset, confined_path
from core.datasets.generic import ProblemCollector, folder_images, load_layout
from core.datasets.registry import SOURCES, SourceAdapter

if TYPE_CHECKING:
    from core.datasets.config import SourceConfig

CUHK_SYSU_FOLDER = "cropped_images"
CUHK_SYSU_NAME = re.compile(r"p(?P<pid>\d+)_s(?P<scene>\d+)(?:_(?P<index>\d+))?\.jpg", re.IGNORECASE)


def _cuhk_sysu_folder(root: Path) -> Path:
    for folder in (root / CUHK_SYSU_FOLDER, root):
        if folder.is_dir() and folder.name == CUHK_SYSU_FOLDER:
            return folder
    raise DatasetError(f"{root}: CUHK-SYSU folder not found (expected {CUHK_SYSU_FOLDER}/ under it)")


def _cuhk_sysu_record(root: Path, image: Path, source: str) -> ImageRecord:
    match = CUHK_SYSU_NAME.fullmatch(image.name)
    if match is None:
        raise DatasetError(f"{image}: file name does not match CUHK-SYSU naming 'pPID_sSCENE_N.jpg'")
    # built directly: make_record would drop a pid 0 from train as a distractor
    path = confined_path(root, image.relative_to(root))
    return ImageRecord(path=str(path), source=source, pid=int(match["pid"]), camid=0, split="train")


def _cuhk_sysu_records(
    root: Path, folder: Path, source: str, problems: ProblemCollector
) -> Iterator[ImageRecord | None]:
    for image in folder_images(root, folder, f"{source} {CUHK_SYSU_FOLDER} folder"):
        yield problems.check(_cuhk_sysu_record, root, image, source)


def load_cuhk_sysu(root: Path, source: str = "cuhk_sysu") -> ReidDataset:
    """Read the CUHK-SYSU crops from `root` (layout in the module docstring); every image is in `train`."""
    return load_layout(root, source, _cuhk_sysu_folder, _cuhk_sysu_records)


@SOURCES.register("cuhk_sysu")
class CuhkSysuSource(SourceAdapter):
    def load(self, config: SourceConfig) -> ReidDataset:
        return load_cuhk_sysu(Path(config.root), source=config.source_name)
