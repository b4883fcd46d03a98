"""The one row type every source adapter produces, and the dataset container.

Adapters differ in how they find images and parse names; downstream code only ever sees
`ImageRecord` rows grouped into a `ReidDataset`. Paths are absolute and confined to the dataset
root (see `confined_path`), so a malicious list file cannot make us read `/etc/passwd`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Split = Literal["train", "query", "gallery"]


class DatasetError(ValueError):
    """A source dataset is missing, malformed or empty. The message names the offending path."""


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One annotated person image.

    `pid` is the identity as the source numbers it (Market's 0000 distractors keep pid 0 and are
    flagged with `distractor=True`; junk -1 never becomes a record). `camid` is 0-based.
    `sequence` is the recording sequence within the camera when the naming carries one (Market's
    `s1`), else 0; `frame` is the frame index, or -1 when unknown.
    """

    path: str
    source: str
    pid: int
    camid: int
    split: Split
    frame: int = -1
    sequence: int = 0
    distractor: bool = False


@dataclass(slots=True)
class ReidDataset:
    """A source dataset split into train / query / gallery records."""

    name: str
    root: Path
    train: list[ImageRecord] = field(default_factory=list)
    query: list[ImageRecord] = field(default_factory=list)
    gallery: list[ImageRecord] = field(default_factory=list)

    @property
    def train_identities(self) -> list[int]:
        """Sorted pids that may seed generation: training ids that are not distractors."""
        return sorted({r.pid for r in self.train if not r.distractor})

    def summary(self) -> str:
        def ids(rows: list[ImageRecord]) -> int:
            return len({r.pid for r in rows})

        return (
            f"{self.name}: train {len(self.train)} images / {ids(self.train)} ids / "
            f"{len({r.camid for r in self.train})} cams; query {len(self.query)} / {ids(self.query)} ids; "
            f"gallery {len(self.gallery)} / {ids(self.gallery)} ids"
        )


def confined_path(root: Path, relative: str | os.PathLike[str]) -> Path:
    """Resolve `relative` under `root`, refusing anything that escapes it (`..`, absolute paths,
    symlinks pointing outside)."""
    root_resolved = root.resolve()
    candidate = (root_resolved / relative).resolve()
    if candidate != root_resolved and root_resolved not in candidate.parents:
        raise DatasetError(f"path {str(relative)!r} escapes the dataset root {root_resolved}")
    return candidate


def require_dir(path: Path, what: str) -> Path:
    """Return `path` if it is a directory, else raise a `DatasetError` naming it."""
    if not path.is_dir():
        raise DatasetError(f"{what}: directory not found: {path}")
    return path
