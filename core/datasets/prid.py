"""PRID2011 adapter, single-shot version (Hirzer et al., SCIA 2011), as torchreid reads it.

Layout under `root` (the extracted `prid_2011` folder, or the folder holding it)::

    single_shot/cam_a/person_0001.png ... person_0385.png   385 people
    single_shot/cam_b/person_0001.png ... person_0749.png   749 people

Persons 0001-0200 are the same people in both cameras; beyond 200 each camera numbers its own
people (cam_a's person_0201 is not cam_b's). So pid = the number, except cam_a's persons beyond
200, pid = 1000 + the number (cam_b's numbers stay below 1000): 200 + 185 + 549 identities.
cam_a is camid 0, cam_b camid 1; person numbers start at 1 (0 would read as a distractor).
The multi-shot sequences (`multi_shot/`) are not read. Every image is a training image (a DG
source); the test protocol draws 100 of the 200 people seen by both cameras, query cam_a, gallery
cam_b with the 549 cam_b-only people (`core.datasets.test_splits`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from core.datasets.base import DatasetError, ImageRecord, ReidDataset
from core.datasets.generic import camera_folder_records, load_layout, make_record
from core.datasets.registry import SOURCES, SourceAdapter
from core.datasets.test_splits import TestProtocol

if TYPE_CHECKING:
    from core.datasets.config import SourceConfig

PRID_CAMERAS = ("cam_a", "cam_b")  # camid = position
PRID_NAME = re.compile(r"person_(?P<number>\d+)\.png", re.IGNORECASE)
PAIRED_PERSONS = 200  # persons 1..200 are seen by both cameras
CAM_A_ONLY_OFFSET = 1000  # pid of cam_a's person n > 200: n + 1000, apart from cam_b's own n


def _prid_base(root: Path) -> Path:
    for base in (root / "single_shot", root / "prid_2011" / "single_shot"):
        if base.is_dir():
            return base
    raise DatasetError(f"{root}: PRID2011 folder not found (expected single_shot/ under it or under prid_2011/)")


def _prid_record(root: Path, image: Path, camid: int, source: str) -> ImageRecord | None:
    match = PRID_NAME.fullmatch(image.name)
    if match is None:
        raise DatasetError(f"{image}: file name does not match PRID naming 'person_NNNN.png'")
    number = int(match["number"])
    if number == 0:
        raise DatasetError(f"{image}: person numbers start at 1")
    if number >= CAM_A_ONLY_OFFSET:
        raise DatasetError(f"{image}: person number {number} is beyond PRID's (must stay below {CAM_A_ONLY_OFFSET})")
    pid = number + CAM_A_ONLY_OFFSET if camid == 0 and number > PAIRED_PERSONS else number
    return make_record(root, image.relative_to(root), source=source, pid=pid, camid=camid, split="train")


def load_prid(root: Path, source: str = "prid") -> ReidDataset:
    """Read PRID2011 single-shot from `root` (layout in the module docstring); every image is in `train`."""
    return load_layout(root, source, _prid_base, camera_folder_records(PRID_CAMERAS, _prid_record))


@SOURCES.register("prid")
class PridSource(SourceAdapter):
    test_protocol = TestProtocol(test_ids=100, query_cameras=(0,), gallery_cameras=(1,))

    def load(self, config: SourceConfig) -> ReidDataset:
        return load_prid(Path(config.root), source=config.source_name)
