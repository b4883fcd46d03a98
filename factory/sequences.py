"""Identity sequences: group source records by (source, pid) and pick each identity's input
sequence; read its images, quarantining the ones that do not decode."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from core.datasets.base import ImageRecord, ReidDataset
from core.datasets.images import read_images
from factory.schema import SEQUENCE_SCHEMA
from core.settings.stages import SequenceConfig


def stable_seed(*parts: object) -> int:
    """A 31-bit seed derived from `parts` that is the same on every machine and Python run
    (unlike `hash()`, which is salted per process)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def identity_key(source: str, source_pid: int) -> str:
    return f"{source}/{source_pid}"


@dataclass(frozen=True)
class IdentitySequence:
    """The input image sequence chosen for one source identity."""

    source: str
    source_pid: int
    camid: int
    records: tuple[ImageRecord, ...]

    @property
    def key(self) -> str:
        return identity_key(self.source, self.source_pid)


def _frame_order(record: ImageRecord) -> tuple[int, int, str]:
    return (record.sequence, record.frame, record.path)


def select_sequence(records: Sequence[ImageRecord], config: SequenceConfig) -> IdentitySequence:
    """Pick the input sequence of one identity.

    `longest_camera_run` follows the paper (consecutive images from one camera): the camera with
    the most images (lowest camid on ties), frames in order, the first `max_images`.
    `all_cameras` takes images of every camera in (camera, frame) order.
    """
    if config.strategy == "longest_camera_run":
        by_camera: dict[int, list[ImageRecord]] = defaultdict(list)
        for record in records:
            by_camera[record.camid].append(record)
        camid = min(by_camera, key=lambda cam: (-len(by_camera[cam]), cam))
        chosen = sorted(by_camera[camid], key=_frame_order)
    else:
        camid = -1
        chosen = sorted(records, key=lambda r: (r.camid, *_frame_order(r)))
    return IdentitySequence(records[0].source, records[0].pid, camid, tuple(chosen[: config.max_images]))


def plan_identities(datasets: Iterable[ReidDataset], config: SequenceConfig) -> list[IdentitySequence]:
    """All generation identities in a stable order: training ids of every source, distractors
    never included. `max_identities` keeps the first N of that order."""
    groups: dict[tuple[str, int], list[ImageRecord]] = defaultdict(list)
    for dataset in datasets:
        for record in dataset.train:
            if not record.distractor:
                groups[(record.source, record.pid)].append(record)
    return [select_sequence(groups[key], config) for key in sorted(groups)][: config.max_identities]


@dataclass
class ReadReport:
    """What reading the planned sequences found wrong (written to DIR/quarantine.json)."""

    quarantined: list[dict[str, str]] = field(default_factory=list)  # {"path", "identity", "reason"}
    skipped_identities: list[dict[str, str]] = field(default_factory=list)  # {"identity", "reason"}


def read_sequences(plan: Sequence[IdentitySequence], config: SequenceConfig, base_seed: int,
                   threads: int = 8) -> tuple[pa.Table, ReadReport]:
    """Read the bytes of every planned sequence into a `SEQUENCE_SCHEMA` table.

    Corrupt or unreadable images are quarantined; identities left with fewer than
    `min_images` readable images are skipped. Both are reported, neither stops the run.
    """
    report = ReadReport()
    loaded = read_images([record.path for sequence in plan for record in sequence.records], threads)

    rows = []
    for sequence in plan:
        good = []
        for record in sequence.records:
            result = loaded[record.path]
            if isinstance(result, bytes):
                good.append((record, result))
            else:
                report.quarantined.append({"path": record.path, "identity": sequence.key, "reason": result})
        if len(good) < config.min_images:
            report.skipped_identities.append(
                {"identity": sequence.key, "reason": f"{len(good)} readable images < min_images {config.min_images}"})
            continue
        rows.append({"identity": sequence.key, "source": sequence.source, "source_pid": sequence.source_pid,
                     "camid": sequence.camid, "image_paths": [r.path for r, _ in good],
                     "image_bytes": [data for _, data in good], "frames": [r.frame for r, _ in good],
                     "seed": stable_seed(base_seed, sequence.key)})
    return pa.Table.from_pylist(rows, schema=SEQUENCE_SCHEMA), report
