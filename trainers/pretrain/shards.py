"""The factory's shards as pre-training input: checked before any training starts, and written
from any Re-ID dataset (so pre-training can also run on source data, and tests need no factory run).

`inspect_shards` reads only Parquet footers and the `pid` column, so it costs milliseconds even for
Diff-Person's 777K rows, and it names the file and the problem when something is off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from core.storage import Location, StorageError, resolve
from core.datasets.base import ImageRecord
from core.shards import SHARD_SCHEMA, SHARDS_DIR, dense_labels, encode_image

# What pre-training reads; the other SHARD_SCHEMA columns are provenance.
REQUIRED_COLUMNS = ("image", "pid")
_MAX_LISTED = 10


class ShardError(ValueError):
    """The data folder cannot be pre-trained on; the message names the path and the problem."""


@dataclass(frozen=True)
class ShardSummary:
    """What `inspect_shards` found: the files, their rows and the dense pid range."""

    shards_dir: str  # URI
    files: tuple[str, ...]  # URIs, for Ray Data / pyarrow
    num_rows: int
    num_classes: int  # max pid + 1 (pids are dense, so also the number of identities)

    def describe(self) -> str:
        return (f"{self.num_rows} images of {self.num_classes} identities in {len(self.files)} "
                f"shard(s) under {self.shards_dir}")


def find_shard_files(data_dir: str | Path | Location) -> tuple[Location, list[Location]]:
    """(`DIR/shards`, its `*.parquet` files, sorted) for any URI; ShardError when there are none."""
    try:
        data = resolve(data_dir)
        exists, is_dir = data.exists(), data.is_dir()
    except StorageError as err:
        raise ShardError(f"data dir cannot be read: {err}") from None
    if not exists:
        raise ShardError(f"data dir not found: {data}")
    if not is_dir:
        raise ShardError(f"data dir is not a folder: {data}")
    shards_dir = data / SHARDS_DIR
    files = shards_dir.files(".parquet")
    if not files:
        if not shards_dir.exists():
            raise ShardError(f"no {SHARDS_DIR}/ folder in {data} (expected {shards_dir}/*.parquet, "
                             "as written by `python -m factory.build --out DIR`)")
        raise ShardError(f"no Parquet shards in {shards_dir} (expected *.parquet files)")
    return shards_dir, files


def _check_schema(path: Location, schema: pa.Schema) -> None:
    missing = [name for name in REQUIRED_COLUMNS if name not in schema.names]
    if missing:
        raise ShardError(f"{path} lacks required column(s) {missing} (it has {schema.names}); "
                         f"pre-training needs {list(REQUIRED_COLUMNS)} as in core.shards.SHARD_SCHEMA")
    image = schema.field("image").type
    has_bytes = pa.types.is_struct(image) and image.get_field_index("bytes") >= 0
    if not has_bytes or not (pa.types.is_binary(image.field("bytes").type)
                             or pa.types.is_large_binary(image.field("bytes").type)):
        raise ShardError(f"{path}: column 'image' must be a struct with a binary 'bytes' field, got {image}")
    if not pa.types.is_integer(schema.field("pid").type):
        raise ShardError(f"{path}: column 'pid' must be an integer, got {schema.field('pid').type}")


def _dense_error(pids: np.ndarray) -> str | None:
    """Why `pids` are not dense over 0..max (None when they are)."""
    if pids.min() < 0:
        return f"negative pid {int(pids.min())}"
    present = np.unique(pids)
    top = int(present[-1])
    if len(present) == top + 1:
        return None
    missing = np.setdiff1d(np.arange(top + 1), present)
    listed = ", ".join(map(str, missing[:_MAX_LISTED].tolist()))
    more = f" ... and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
    return (f"{len(present)} distinct pids in 0..{top}, missing [{listed}{more}]; "
            "pids must be 0..N-1 with every value used (they are the classification labels)")


def inspect_shards(data_dir: str | Path | Location) -> ShardSummary:
    """Check `DIR/shards/*.parquet` for pre-training: files present, columns `image` (struct with
    binary `bytes`) and integer `pid`, at least one row, no null pid, pids dense 0..N-1; a
    `ShardError` names the path and the problem."""
    shards_dir, files = find_shard_files(data_dir)
    pid_chunks = []
    for path in files:
        try:
            schema = pq.read_schema(path.path, filesystem=path.filesystem)
        except (pa.ArrowException, OSError) as err:
            raise ShardError(f"{path} is not a readable Parquet file: {err}") from None
        _check_schema(path, schema)
        column = path.read_parquet(columns=["pid"]).column("pid")
        if column.null_count:
            raise ShardError(f"{path}: column 'pid' has {column.null_count} null value(s)")
        pid_chunks.append(column.to_numpy())
    pids = np.concatenate(pid_chunks) if pid_chunks else np.empty(0, np.int64)
    if pids.size == 0:
        raise ShardError(f"the shards in {shards_dir} hold no rows")
    problem = _dense_error(pids)
    if problem:
        raise ShardError(f"pid column of {shards_dir} is not dense: {problem}")
    return ShardSummary(shards_dir=shards_dir.uri, files=tuple(f.uri for f in files), num_rows=int(pids.size),
                        num_classes=int(pids.max()) + 1)


def records_table(records: Sequence[ImageRecord], image_size: tuple[int, int] | None = None) -> pa.Table:
    """Re-ID records (e.g. a dataset's training split) as rows of `SHARD_SCHEMA`: images re-encoded
    as JPEG (resized to `image_size` if given), distractors dropped, `pid` still the source's
    (`write_table_shards` makes it dense)."""
    kept = sorted((r for r in records if not r.distractor), key=lambda r: (r.source, r.pid, r.path))
    rows = []
    index_of: dict[tuple[str, int], int] = {}
    for record in kept:
        with Image.open(record.path) as image:
            data = encode_image(image, image_size)
        index = index_of[record.source, record.pid] = index_of.get((record.source, record.pid), -1) + 1
        rows.append({"image": {"bytes": data, "path": Path(record.path).name}, "pid": record.pid,
                     "source": record.source, "source_pid": record.pid, "identity": f"{record.source}/{record.pid}",
                     "prompt": "", "seed": 0, "score": 1.0,  # a real image: no prompt, seed or filter score
                     "index": index})
    return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)


def read_shard_table(data_dir: str | Path | Location) -> pa.Table:
    """Every row of `DIR/shards/*.parquet` in `SHARD_SCHEMA` (the files' own metadata dropped)."""
    _, files = find_shard_files(data_dir)
    return pa.concat_tables([f.read_parquet().select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA) for f in files])


def write_table_shards(table: pa.Table, data_dir: str | Path | Location, rows_per_shard: int = 4096) -> ShardSummary:
    """Write `table` (`SHARD_SCHEMA` rows) as `DIR/shards/part-*.parquet` on any URI, with `pid`
    relabelled dense over the identities sorted by (source, source_pid) (rows of one identity from several
    tables, real and generated, share a label)."""
    if table.num_rows == 0:
        raise ShardError("no rows to write")
    keys = zip(table.column("source").to_pylist(), table.column("source_pid").to_pylist(),
               table.column("identity").to_pylist())
    label_of = {identity: label for (_, _, identity), label in dense_labels(keys).items()}
    labels = pa.array([label_of[i] for i in table.column("identity").to_pylist()], pa.int64())
    table = table.set_column(table.schema.get_field_index("pid"), "pid", labels).sort_by([("pid", "ascending")])
    shards_dir = resolve(data_dir) / SHARDS_DIR
    for old in shards_dir.files(".parquet"):  # a rewrite replaces the set, never mixes two
        old.delete()
    # Location.write_parquet per shard (atomic on every store), not pyarrow.dataset.write_dataset.
    for number, start in enumerate(range(0, table.num_rows, rows_per_shard)):
        (shards_dir / f"part-{number:05d}.parquet").write_parquet(table.slice(start, rows_per_shard))
    return inspect_shards(data_dir)


def write_shards(
    records: Sequence[ImageRecord],
    data_dir: str | Path | Location,
    image_size: tuple[int, int] | None = None,
    rows_per_shard: int = 4096,
) -> ShardSummary:
    """Write `records` (e.g. a Re-ID dataset's training split) as `DIR/shards/part-*.parquet` in
    the factory's `SHARD_SCHEMA` (see `records_table`), `pid` dense over the sorted identities."""
    table = records_table(records, image_size)
    if table.num_rows == 0:
        raise ShardError("no records to write (after dropping distractors)")
    return write_table_shards(table, data_dir, rows_per_shard)
