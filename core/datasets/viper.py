"""VIPeR adapter (Gray et al., PETS 2007): 632 people, one image in each of two cameras.

Layout under `root` (the extracted `VIPeR` folder, or the folder holding it)::

    cam_a/000_45.bmp  cam_a/001_45.bmp  ...      NNN_ANGLE.bmp
    cam_b/000_<ANGLE>.bmp  ...

The name is `NNN_ANGLE.bmp`: NNN numbers the person (the same number in both cameras, as
fast-reid reads it; torchreid pairs the sorted lists, which is the same pairing), ANGLE the
viewpoint. The numbers start at 000, and pid 0 marks a distractor here, so pid = NNN + 1.
cam_a is camid 0, cam_b camid 1. Every image is a training image (a DG source); the test protocol
draws 316 identities, query cam_a, gallery cam_b (`core.datasets.test_splits`).
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

VIPER_CAMERAS = ("cam_a", "cam_b")  # camid = position
VIPER_NAME = re.compile(r"(?P<number>\d+)_(?P<angle>\d+)\.bmp", re.IGNORECASE)


def _viper_base(root: Path) -> Path:
    for base in (root, root / "VIPeR"):
        if (base / VIPER_CAMERAS[0]).is_dir():
            return base
    raise DatasetError(f"{root}: VIPeR folder not found (expected cam_a/ and cam_b/ under it or under VIPeR/)")


def _viper_record(root: Path, image: Path, camid: int, source: str) -> ImageRecord | None:
    match = VIPER_NAME.fullmatch(image.name)
    if match is None:
        raise DatasetError(f"{image}: file name does not match VIPeR naming 'NNN_ANGLE.bmp'")
    pid = int(match["number"]) + 1
    return make_record(root, image.relative_to(root), source=source, pid=pid, camid=camid, split="train")


def load_viper(root: Path, source: str = "viper") -> ReidDataset:
    """Read VIPeR from `root` (layout in the module docstring); every image is in `train`."""
    return load_layout(root, source, _viper_base, camera_folder_records(VIPER_CAMERAS, _viper_record))


@SOURCES.register("viper")
class ViperSource(SourceAdapter):
    test_protocol = TestProtocol(test_ids=316, query_cameras=(0,), gallery_cameras=(1,))

    def load(self, config: SourceConfig) -> ReidDataset:
        return load_viper(Path(config.root), source=config.source_name)
