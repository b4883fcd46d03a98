"""Building blocks shared by the adapters, and the two generic sources: `folder` and `csv`.

Conventions every adapter applies through `make_record` (fast-reid / torchreid style): pid -1 is
junk and never becomes a record; pid 0 marks a distractor, kept in query/gallery with
`distractor=True` and dropped from train so it never seeds generation. MSMT17, where pid 0 is a
real person, builds its records directly instead.

Adapters list files and parse names only; they never decode images, so loading a 100k-image
dataset takes seconds.

`folder` layout (images directly inside each pid folder, pid folder names are integers)::

    root/<pid>/<image>                      every image is a training image
    root/train/<pid>/<image>                or split folders; `train/` is required,
    root/query/<pid>/<image>                `query/` and `gallery/` are optional
    root/gallery/<pid>/<image>

The camera is 0 unless the file name carries Market's `_c<digit>` (camid = digit - 1); full
Market names also give sequence and frame.

`csv` layout: `list_file` (default `<root>/list.csv`) with a header row naming the columns
`path,pid,camid` and optionally `split` (train|query|gallery, default train), `frame` and
`sequence`; `path` is relative to `root`, `camid` is 0-based.

Per-entry problems (a path escaping the root, a malformed name or list line, a bad pid/camid) are
gathered by a `ProblemCollector` while one dataset loads and reported together in one
`DatasetError`, so a broken tree is fixed in one pass instead of one error per run. The dataset is
refused as a whole when any exists. Structural problems (missing root, folder or list file, bad CSV
header, no training identities) still raise at once.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec, TypeVar, get_args

from core.datasets.base import DatasetError, ImageRecord, ReidDataset, Split, confined_path, require_dir
from core.datasets.registry import SOURCES, SourceAdapter

if TYPE_CHECKING:
    from core.datasets.config import SourceConfig

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
SPLITS: tuple[Split, ...] = get_args(Split)
JUNK_PID = -1
DISTRACTOR_PID = 0

# Market-style name: `0002_c1s1_000451_03` or CUHK03-NP's `0001_c1_1`. The optional trailing
# index is the frame when the name has no `s<seq>_<frame>` part.
MARKET_NAME = re.compile(r"^(?P<pid>-?\d+)_c(?P<cam>\d)(?:s(?P<seq>\d+)_(?P<frame>\d+))?(?:_(?P<index>\d+))?")
CAMERA_TAG = re.compile(r"_c(?P<cam>\d)")  # the camera part alone, for free-form names
DEFAULT_CSV_NAME = "list.csv"
CSV_REQUIRED = ("path", "pid", "camid")
CSV_OPTIONAL = ("split", "frame", "sequence")
MAX_LISTED_PROBLEMS = 20  # a tree with thousands of bad names must not produce a megabyte message

P = ParamSpec("P")
T = TypeVar("T")


class ProblemCollector:
    """The per-entry problems of one dataset load, raised together as one `DatasetError`.

    Adapters run each entry (one image, one list line) through `check`; a `DatasetError` it raises
    is recorded instead of propagating, so every bad entry is reported, not only the first. The
    entry yields no record, and `raise_if_any` at the end of the load refuses the whole dataset:
    nothing from a listing with problems (in particular nothing outside the root) is returned.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def check(self, entry: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | None:
        """`entry(*args, **kwargs)`, or None after recording the `DatasetError` it raised.

        None is also what a dropped (junk) entry returns; either way there is no record to keep,
        and a recorded problem makes `raise_if_any` refuse the dataset.
        """
        try:
            return entry(*args, **kwargs)
        except DatasetError as err:
            self.problems.append(str(err))
            return None

    def raise_if_any(self, where: Path) -> None:
        """Raise one `DatasetError` listing the recorded problems (at most `MAX_LISTED_PROBLEMS`, then
        a count of the rest), the total in its first line; do nothing when there are none."""
        total = len(self.problems)
        if total == 0:
            return
        noun = "problem" if total == 1 else "problems"
        head = f"{self.source} at {where}: {total} {noun} in the dataset listing"
        lines = [f"{head} (nothing was read):"]
        lines.extend(f"  {problem}" for problem in self.problems[:MAX_LISTED_PROBLEMS])
        if total > MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {total - MAX_LISTED_PROBLEMS} more")
        raise DatasetError("\n".join(lines))


def list_images(directory: Path) -> list[Path]:
    """Image files directly inside `directory`, sorted by name (Market folders also hold
    `Thumbs.db` and the like, which are skipped)."""
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())


def folder_images(root: Path, directory: Path, what: str) -> list[Path]:
    """The images of a folder the layout requires (`what` names it when it is missing), sorted.

    A folder linked outside `root` is refused before it is listed: a structural error, raised at
    once, not a per-entry problem.
    """
    directory = require_dir(directory, what)
    confined_path(root, directory.relative_to(root))
    return list_images(directory)


def make_record(
    root: Path,
    relative: str | Path,
    *,
    source: str,
    pid: int,
    camid: int,
    split: Split,
    frame: int = -1,
    sequence: int = 0,
) -> ImageRecord | None:
    """Build a record under the junk/distractor conventions; None when the image is dropped.

    The path is resolved with `confined_path`, so it is absolute and inside `root`.
    """
    if pid == JUNK_PID:
        return None
    if pid < JUNK_PID:
        raise DatasetError(f"{relative}: pid must be >= -1, got {pid}")
    if camid < 0:
        raise DatasetError(f"{relative}: camid must be >= 0 (0-based), got {camid}")
    distractor = pid == DISTRACTOR_PID
    if distractor and split == "train":
        return None  # a distractor has no identity to learn or to generate from
    return ImageRecord(
        path=str(confined_path(root, relative)),
        source=source,
        pid=pid,
        camid=camid,
        split=split,
        frame=frame,
        sequence=sequence,
        distractor=distractor,
    )


def parse_market_name(path: Path) -> tuple[int, int, int, int]:
    """Parse a Market-style file name into (pid, 0-based camid, sequence, frame).

    `0002_c1s1_000451_03.jpg` -> (2, 0, 1, 451); `0001_c1_7.png` (CUHK03-NP) -> (1, 0, 0, 7);
    frame is -1 when the name carries none. Raises `DatasetError` naming the path otherwise.
    """
    match = MARKET_NAME.match(path.name)
    if match is None:
        raise DatasetError(f"{path}: file name does not match Market naming 'PID_cCAM...'")
    cam = int(match["cam"])
    if cam == 0:
        raise DatasetError(f"{path}: camera numbers start at c1, got c0")
    if match["frame"] is not None:
        return int(match["pid"]), cam - 1, int(match["seq"]), int(match["frame"])
    frame = int(match["index"]) if match["index"] is not None else -1
    return int(match["pid"]), cam - 1, 0, frame


def assemble(
    problems: ProblemCollector, root: Path, records: Iterable[ImageRecord | None], where: Path,
    empty_where: Path | None = None,
) -> ReidDataset:
    """The dataset of `records` (None: dropped, or a recorded problem), each in its split. The
    load's problems are raised first, naming `where` (an all-bad tree names its entries), then an
    empty train split (nothing to generate from), naming `empty_where` (default `where`)."""
    dataset = ReidDataset(name=problems.source, root=root)
    for record in records:
        if record is not None:
            getattr(dataset, record.split).append(record)
    problems.raise_if_any(where)
    if not dataset.train_identities:
        raise DatasetError(f"{empty_where or where}: no training identities found (dataset is empty)")
    return dataset


# (root, the layout's folder, source name, problems) -> the records of every entry in the layout
LayoutRecords = Callable[[Path, Path, str, ProblemCollector], Iterable[ImageRecord | None]]


def load_layout(root: Path, source: str, locate: Callable[[Path], Path], records: LayoutRecords) -> ReidDataset:
    """Read a dataset whose files lie in one folder found under `root`: `root` must be a folder,
    `locate(root)` finds the layout's folder (raising `DatasetError` when it is absent) and
    `records` lists it; the load's problems and an empty train split name that folder."""
    root = require_dir(Path(root), f"{source} dataset root")
    base = locate(root)
    problems = ProblemCollector(source)
    return assemble(problems, root, records(root, base, source, problems), base)


def camera_folder_records(
    folders: Sequence[str], record: Callable[[Path, Path, int, str], ImageRecord | None]
) -> LayoutRecords:
    """The records of a layout with one folder per camera, all required: camid is the folder's
    position in `folders`, and `record(root, image, camid, source)` reads each image."""

    def records(root: Path, base: Path, source: str, problems: ProblemCollector) -> Iterator[ImageRecord | None]:
        for camid, folder in enumerate(folders):
            for image in folder_images(root, base / folder, f"{source} {folder} folder"):
                yield problems.check(record, root, image, camid, source)

    return records


def resolve_list_file(root: Path, list_file: str | Path | None, default_name: str) -> Path:
    """The list file to read: `list_file` (relative paths are taken under `root`) or the default."""
    path = root / (list_file if list_file is not None else default_name)
    if not path.is_file():
        raise DatasetError(f"list file not found: {path}")
    return path


def iter_list_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield (1-based line number, whitespace-separated fields) of a list file, skipping blank
    lines and `#` comments."""
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            stripped = line.strip()
            if stripped and not stripped.startswith("#"):
                yield lineno, stripped.split()


@contextmanager
def located(where: str) -> Iterator[None]:
    """Prefix a `DatasetError` raised inside with `where` (`file:line`) unless it has it."""
    try:
        yield
    except DatasetError as err:
        if str(err).startswith(where):
            raise
        raise DatasetError(f"{where}: {err}") from None


def parse_int(value: str, what: str, where: str) -> int:
    """`int(value)`, or a `DatasetError` naming the field and `where` (file:line)."""
    try:
        return int(value)
    except ValueError:
        raise DatasetError(f"{where}: {what} must be an integer, got {value!r}") from None


def parse_split(value: str, where: str) -> Split:
    """Check a split name read from a list file."""
    if value not in SPLITS:
        raise DatasetError(f"{where}: split must be one of {list(SPLITS)}, got {value!r}")
    return value  # type: ignore[return-value]  # checked against the Literal's values above


def image_record(
    root: Path, image: Path, split: Split, source: str, pid: int | None = None
) -> ImageRecord | None:
    """The record of one image file (None when dropped). Without `pid` the name must follow
    Market naming and gives it all; with `pid` (a `folder` identity) Market naming supplies
    camera/frame when present, else a `_c<digit>` tag the camera, else camera 0."""
    camera = CAMERA_TAG.search(image.stem)
    if pid is None or MARKET_NAME.match(image.name):
        name_pid, camid, sequence, frame = parse_market_name(image)
        pid = name_pid if pid is None else pid
    elif camera is not None and camera["cam"] != "0":
        camid, sequence, frame = int(camera["cam"]) - 1, 0, -1
    else:
        camid, sequence, frame = 0, 0, -1
    return make_record(
        root, image.relative_to(root), source=source, pid=pid, camid=camid, split=split,
        frame=frame, sequence=sequence,
    )


def _pid_folder(root: Path, pid_dir: Path) -> int:
    """The pid a `folder` identity folder names; the folder must lie inside `root` (a symlink
    pointing outside would make us list a foreign directory)."""
    if not re.fullmatch(r"-?\d+", pid_dir.name):
        raise DatasetError(f"{pid_dir}: identity folder names must be integers")
    confined_path(root, pid_dir.relative_to(root))
    return int(pid_dir.name)


def _pid_folder_records(
    root: Path, split_dirs: dict[Split, Path], source: str, problems: ProblemCollector
) -> Iterator[ImageRecord | None]:
    for split, split_dir in split_dirs.items():
        confined_path(root, split_dir.relative_to(root))  # structural: refuse before listing it
        for pid_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            pid = problems.check(_pid_folder, root, pid_dir)
            if pid is None:
                continue  # recorded; its images are not even listed
            for image in list_images(pid_dir):
                yield problems.check(image_record, root, image, split, source, pid)


def load_folder(root: Path, source: str = "folder") -> ReidDataset:
    """Read `root/<pid>/<images>` (all train) or `root/<split>/<pid>/<images>` (see module doc)."""
    root = require_dir(Path(root), f"{source} dataset root")
    split_dirs = {split: root / split for split in SPLITS if (root / split).is_dir()}
    if split_dirs:
        require_dir(root / "train", f"{source} train split")
    problems = ProblemCollector(source)
    records = _pid_folder_records(root, split_dirs or {"train": root}, source, problems)
    return assemble(problems, root, records, root)


@SOURCES.register("folder")
class FolderSource(SourceAdapter):
    def load(self, config: SourceConfig) -> ReidDataset:
        return load_folder(Path(config.root), source=config.source_name)


def _csv_record(root: Path, row: dict[str, str], columns: int, source: str, where: str) -> ImageRecord | None:
    # DictReader puts surplus fields under the key None and fills missing ones with None
    if None in row or any(row.get(c) is None for c in CSV_REQUIRED):
        raise DatasetError(f"{where}: expected {columns} columns")

    def optional_int(name: str, default: int) -> int:
        value = (row.get(name) or "").strip()
        return parse_int(value, name, where) if value else default

    split = parse_split((row.get("split") or "").strip() or "train", where)
    with located(where):
        return make_record(
            root, row["path"].strip(), source=source,
            pid=parse_int(row["pid"].strip(), "pid", where),
            camid=parse_int(row["camid"].strip(), "camid", where),
            split=split, frame=optional_int("frame", -1), sequence=optional_int("sequence", 0),
        )


def _check_csv_header(fields: list[str] | None, path: Path) -> None:
    if fields is None:
        raise DatasetError(f"{path}:1: empty file, expected a header row path,pid,camid[,split]")
    missing = [c for c in CSV_REQUIRED if c not in fields]
    unknown = [c for c in fields if c not in CSV_REQUIRED + CSV_OPTIONAL]
    if missing or unknown:
        raise DatasetError(
            f"{path}:1: header must name {list(CSV_REQUIRED)} and optionally {list(CSV_OPTIONAL)}; "
            f"missing {missing}, unknown {unknown}"
        )


def _csv_records(root: Path, path: Path, source: str, problems: ProblemCollector) -> Iterator[ImageRecord | None]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        _check_csv_header(reader.fieldnames, path)
        columns = len(reader.fieldnames or [])
        for row in reader:
            where = f"{path}:{reader.line_num}"
            yield problems.check(_csv_record, root, row, columns, source, where)


def load_csv(root: Path, list_file: str | Path | None = None, source: str = "csv") -> ReidDataset:
    """Read a CSV list (header `path,pid,camid[,split][,frame][,sequence]`, see module doc)."""
    root = require_dir(Path(root), f"{source} dataset root")
    path = resolve_list_file(root, list_file, DEFAULT_CSV_NAME)
    problems = ProblemCollector(source)
    return assemble(problems, root, _csv_records(root, path, source, problems), root, path)


@SOURCES.register("csv")
class CsvSource(SourceAdapter):
    def load(self, config: SourceConfig) -> ReidDataset:
        return load_csv(Path(config.root), list_file=config.list_file, source=config.source_name)
