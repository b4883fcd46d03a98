"""QMUL GRID adapter (Loy et al., CVPR 2009; the `underground_reid` release), as torchreid reads it.

Layout under `root` (the extracted `underground_reid` folder, or the folder holding it)::

    probe/0005_2_25100_229_94_99_249.jpeg      250 images, one per paired person
    gallery/0005_<CAM>_....jpeg                1025 images: the 250 partners + 775 others

A name is `PPPP_CAM_FRAME_<box fields>.jpeg`: PPPP the person (0000 for the 775 gallery images of
unpaired people), CAM the camera 1..8 (camid = CAM - 1), FRAME the frame index. Both folders mix
the same eight cameras, so the test protocol picks query and gallery by folder, not by camera.
`features_and_partitions.mat` (the fixed partitions) is not read: splits are drawn at random.

Records: paired people (PPPP > 0) go to `train` (GRID as a DG source); the 0000 images are
distractors, kept in `gallery` with `distractor=True` so every test split's gallery holds them
(a distractor never enters `train`). The test protocol draws 125 of the 250 paired people, query
probe/, gallery gallery/ (125 + 775 distractors; `core.datasets.test_splits`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from core.datasets.base import DatasetError, ImageRecord, ReidDataset
from core.datasets.generic import DISTRACTOR_PID, ProblemCollector, folder_images, load_layout, make_record
from core.datasets.registry import SOURCES, SourceAdapter
from core.datasets.test_splits import TestProtocol

if TYPE_CHECKING:
    from core.datasets.config import SourceConfig

GRID_FOLDERS = ("probe", "gallery")
GRID_NAME = re.compile(r"(?P<pid>\d+)_(?P<cam>\d+)_(?P<frame>\d+)(?:_\d+)*\.jpe?g", re.IGNORECASE)


def _grid_base(root: Path) -> Path:
    for base in (root, root / "underground_reid"):
        if (base / GRID_FOLDERS[0]).is_dir():
            return base
    raise DatasetError(
        f"{root}: GRID folder not found (expected probe/ and gallery/ under it or under underground_reid/)"
    )


def _grid_record(root: Path, image: Path, source: str) -> ImageRecord | None:
    match = GRID_NAME.fullmatch(image.name)
    if match is None:
        raise DatasetError(f"{image}: file name does not match GRID naming 'PPPP_CAM_FRAME_....jpeg'")
    pid, cam = int(match["pid"]), int(match["cam"])
    if cam == 0:
        raise DatasetError(f"{image}: camera numbers start at 1, got 0")
    split = "gallery" if pid == DISTRACTOR_PID else "train"
    return make_record(
        root, image.relative_to(root), source=source, pid=pid, camid=cam - 1, split=split,
        frame=int(match["frame"]),
    )


def _grid_records(root: Path, base: Path, source: str, problems: ProblemCollector) -> Iterator[ImageRecord | None]:
    for folder in GRID_FOLDERS:
        for image in folder_images(root, base / folder, f"{source} {folder} folder"):
            yield problems.check(_grid_record, root, image, source)


def load_grid(root: Path, source: str = "grid") -> ReidDataset:
    """Read GRID from `root` (layout in the module docstring): paired people in `train`, the
    0000 distractors in `gallery`."""
    return load_layout(root, source, _grid_base, _grid_records)


@SOURCES.register("grid")
class GridSource(SourceAdapter):
    test_protocol = TestProtocol(test_ids=125, query_folders=("probe",), gallery_folders=("gallery",))

    def load(self, config: SourceConfig) -> ReidDataset:
        return load_grid(Path(config.root), source=config.source_name)
