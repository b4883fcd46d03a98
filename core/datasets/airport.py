"""Airport (ALERT) adapter, read from one list file.

The ALERT Airport release ships images plus MATLAB partition files; convert them once into this
plain list (default `<root>/list.txt`, or `list_file`, relative to `root` unless absolute)::

    # RELPATH                     PID  CAMID  [SPLIT]  [FRAME]
    images/cam01/00123_04.jpg     17   0      train    4
    images/cam03/00456_01.jpg     17   2      train
    images/cam02/00789_02.jpg     523  1      query
    images/cam05/01011_00.jpg     0    4      gallery

- fields are whitespace-separated (no spaces in paths); blank lines and `#` comments are ignored
- RELPATH is relative to `root` and may not leave it
- PID is an integer; -1 marks junk (dropped), 0 a distractor (gallery/query only, flagged)
- CAMID is 0-based
- SPLIT is `train` (default), `query` or `gallery`; FRAME (default -1) orders a camera's frames

Every malformed or escaping line is reported in one error; nothing is read when any exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from core.datasets.base import DatasetError, ImageRecord, ReidDataset, require_dir
from core.datasets.generic import (
    ProblemCollector, assemble, iter_list_lines, located, make_record, parse_int, parse_split,
    resolve_list_file,
)
from core.datasets.registry import SOURCES, SourceAdapter

if TYPE_CHECKING:
    from core.datasets.config import SourceConfig

DEFAULT_AIRPORT_LIST = "list.txt"


def _airport_record(root: Path, fields: list[str], source: str, where: str) -> ImageRecord | None:
    if not 3 <= len(fields) <= 5:
        raise DatasetError(f"{where}: expected 'RELPATH PID CAMID [SPLIT] [FRAME]', got {' '.join(fields)!r}")
    relpath, pid, camid = fields[:3]
    split = parse_split(fields[3], where) if len(fields) > 3 else "train"
    frame = parse_int(fields[4], "frame", where) if len(fields) > 4 else -1
    with located(where):
        return make_record(
            root, relpath, source=source, pid=parse_int(pid, "pid", where),
            camid=parse_int(camid, "camid", where), split=split, frame=frame,
        )


def load_airport(root: Path, list_file: str | Path | None = None, source: str = "airport") -> ReidDataset:
    """Read the Airport list file (format in the module docstring)."""
    root = require_dir(Path(root), f"{source} dataset root")
    path = resolve_list_file(root, list_file, DEFAULT_AIRPORT_LIST)
    problems = ProblemCollector(source)
    records = (
        problems.check(_airport_record, root, fields, source, f"{path}:{lineno}")
        for lineno, fields in iter_list_lines(path)
    )
    return assemble(problems, root, records, root, path)


@SOURCES.register("airport")
class AirportSource(SourceAdapter):
    def load(self, config: SourceConfig) -> ReidDataset:
        return load_airport(Path(config.root), list_file=config.list_file, source=config.source_name)
