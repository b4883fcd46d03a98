"""QMUL i-LIDS adapter (Zheng et al., BMVC 2009; i-LIDS MCTS airport crops), as torchreid reads it.
Not iLIDS-VID (the video dataset).

Layout under `root` (the extracted `i-LIDS_Pedestrian` folder, its `Persons` folder, or the folder
holding `i-LIDS_Pedestrian`)::

    Persons/0001001.jpg  0001002.jpg ...  0119004.jpg      119 people, 476 images

A name is `PPPPIII.jpg`: PPPP the person (from 1), III the image index within the person (kept as
`frame`). The release records no camera, though a person is seen by two or more of the airport's
cameras, so each image gets a pseudo-camera: its position among the person's images (0, 1, ...),
as torchreid uses the index. Two images of a person are thus never "the same camera", which keeps
the evaluation's same-camera rule from removing the one true match of a query.

Every image is a training image (a DG source); the test protocol draws 60 of the 119 people, with
one query and one gallery image each (`core.datasets.test_splits`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from core.datasets.base import DatasetError, ImageRecord, ReidDataset
from core.datasets.generic import ProblemCollector, folder_images, load_layout, make_record
from core.datasets.registry import SOURCES, SourceAdapter
from core.datasets.test_splits import TestProtocol

if TYPE_CHECKING:
    from core.datasets.config import SourceConfig

ILIDS_NAME = re.compile(r"(?P<pid>\d{4})(?P<index>\d{3})\.jpg", re.IGNORECASE)


def _ilids_folder(root: Path) -> Path:
    candidates = [root / "i-LIDS_Pedestrian" / "Persons", root / "Persons"]
    if root.name == "Persons":
        candidates.append(root)
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise DatasetError(f"{root}: i-LIDS folder not found (expected i-LIDS_Pedestrian/Persons/ or Persons/ under it)")


def _ilids_name(image: Path) -> tuple[int, int]:
    """(pid, image index) of an i-LIDS file name."""
    match = ILIDS_NAME.fullmatch(image.name)
    if match is None:
        raise DatasetError(f"{image}: file name does not match i-LIDS naming 'PPPPIII.jpg'")
    pid = int(match["pid"])
    if pid == 0:
        raise DatasetError(f"{image}: person numbers start at 0001")
    return pid, int(match["index"])


def _ilids_records(
    root: Path, folder: Path, source: str, problems: ProblemCollector
) -> Iterator[ImageRecord | None]:
    seen: dict[int, int] = defaultdict(int)  # images of each person so far: the next pseudo-camera
    # sorted by name: a person's images in index order
    for image in folder_images(root, folder, f"{source} Persons folder"):
        parsed = problems.check(_ilids_name, image)
        if parsed is None:
            continue
        pid, index = parsed
        yield problems.check(
            make_record, root, image.relative_to(root), source=source, pid=pid, camid=seen[pid],
            split="train", frame=index,
        )
        seen[pid] += 1


def load_ilids(root: Path, source: str = "ilids") -> ReidDataset:
    """Read QMUL i-LIDS from `root` (layout in the module docstring); every image is in `train`."""
    return load_layout(root, source, _ilids_folder, _ilids_records)


@SOURCES.register("ilids")
class IlidsSource(SourceAdapter):
    test_protocol = TestProtocol(test_ids=60, one_image_per_id=True)

    def load(self, config: SourceConfig) -> ReidDataset:
        return load_ilids(Path(config.root), source=config.source_name)
