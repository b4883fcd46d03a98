"""MSMT17 adapter, V1 and V2 layouts (list files as in torchreid / fast-reid).

Layout under `root` (the extracted `MSMT17_V1` / `MSMT17_V2` folder; `root` may also be its
parent, which holds exactly one of them)::

    V1: train/  test/          list_train.txt list_val.txt list_query.txt list_gallery.txt
    V2: mask_train_v2/  mask_test_v2/   the same four list files

Each list line is `RELPATH PID`, e.g. `0000/0000_000_01_0303morning_0015_0.jpg 0`. RELPATH is
relative to the train folder (train/val lists) or the test folder (query/gallery lists); a path
that already starts with that folder's name (`train/0000/...`) is taken relative to `root`.
Camera = third `_` field of RELPATH minus 1 (`01` -> camid 0), frame = fifth field (`0015`).
train = list_train + list_val. In MSMT17 pid 0 is a real person: there are no distractors.
Every malformed or escaping line of the four lists is reported in one error.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.datasets.base import DatasetError, ImageRecord, ReidDataset, Split, confined_path
from core.datasets.generic import ProblemCollector, assemble, iter_list_lines, located, parse_int
from core.datasets.registry import SOURCES, SourceAdapter

if TYPE_CHECKING:
    from core.datasets.config import SourceConfig


@dataclass(frozen=True)
class Msmt17Layout:
    """Folder names of one MSMT17 release."""

    train_dir: str
    test_dir: str
    top_dir: str  # name of the folder the archive extracts to


MSMT17_LAYOUTS: dict[str, Msmt17Layout] = {
    "v1": Msmt17Layout(train_dir="train", test_dir="test", top_dir="MSMT17_V1"),
    "v2": Msmt17Layout(train_dir="mask_train_v2", test_dir="mask_test_v2", top_dir="MSMT17_V2"),
}
# (list file, the `Msmt17Layout` field naming the image folder it indexes, split)
MSMT17_LISTS: tuple[tuple[str, str, Split], ...] = (
    ("list_train.txt", "train_dir", "train"),
    ("list_val.txt", "train_dir", "train"),
    ("list_query.txt", "test_dir", "query"),
    ("list_gallery.txt", "test_dir", "gallery"),
)


def detect_msmt17(root: Path, variant: str | None) -> tuple[Path, Msmt17Layout]:
    """Find the dataset folder and its layout: `variant` when given, else whichever exists."""
    if variant is not None and variant not in MSMT17_LAYOUTS:
        raise DatasetError(f"{root}: MSMT17 variant must be one of {list(MSMT17_LAYOUTS)}, got {variant!r}")
    names = [variant] if variant is not None else list(MSMT17_LAYOUTS)
    for name in names:
        layout = MSMT17_LAYOUTS[name]
        for base in (root, root / layout.top_dir):
            if (base / layout.train_dir).is_dir():
                return base, layout
    wanted = " or ".join(f"{MSMT17_LAYOUTS[n].train_dir}/" for n in names)
    raise DatasetError(f"{root}: MSMT17 folder not found (expected {wanted} under it)")


def _msmt17_record(
    base: Path, folder: str, fields: list[str], split: Split, source: str, where: str
) -> ImageRecord:
    if len(fields) != 2:
        raise DatasetError(f"{where}: expected 'RELPATH PID', got {' '.join(fields)!r}")
    relpath, pid_text = fields
    parts = Path(relpath).name.split("_")
    if len(parts) < 3:
        raise DatasetError(f"{where}: file name {relpath!r} lacks the camera field PID_IDX_CAM_...")
    camid = parse_int(parts[2], "camera field", where) - 1
    pid = parse_int(pid_text, "pid", where)
    if camid < 0 or pid < 0:
        raise DatasetError(f"{where}: camera must be >= 1 and pid >= 0 in {' '.join(fields)!r}")
    frame = int(parts[4]) if len(parts) > 4 and parts[4].isdigit() else -1
    # Some copies of the lists carry the folder prefix; the images are found either way.
    relative = relpath if Path(relpath).parts[0] == folder else f"{folder}/{relpath}"
    with located(where):
        path = confined_path(base, relative)
    return ImageRecord(path=str(path), source=source, pid=pid, camid=camid, split=split, frame=frame)


def _msmt17_records(
    base: Path, layout: Msmt17Layout, source: str, problems: ProblemCollector
) -> Iterator[ImageRecord | None]:
    for list_name, folder_field, split in MSMT17_LISTS:
        list_path = base / list_name
        if not list_path.is_file():
            raise DatasetError(f"MSMT17 list file not found: {list_path}")
        for lineno, fields in iter_list_lines(list_path):
            where = f"{list_path}:{lineno}"
            yield problems.check(_msmt17_record, base, getattr(layout, folder_field), fields, split, source, where)


def load_msmt17(root: Path, variant: str | None = None, source: str = "msmt17") -> ReidDataset:
    """Read MSMT17 V1 or V2 (detected when `variant` is None) from `root`."""
    base, layout = detect_msmt17(Path(root), variant)
    problems = ProblemCollector(source)
    # one error for all four lists
    return assemble(problems, base, _msmt17_records(base, layout, source, problems), base)


@SOURCES.register("msmt17")
class Msmt17Source(SourceAdapter):
    variants = tuple(MSMT17_LAYOUTS)

    def load(self, config: SourceConfig) -> ReidDataset:
        return load_msmt17(Path(config.root), variant=config.variant, source=config.source_name)
