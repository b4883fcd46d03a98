"""The output location (any URI: a local folder, `s3://bucket/run`, `gs://...`).

Layout of DIR:
  staging/<identity>.parquet   every generated image of one identity (kept or not), written by
                               the worker that finished it (the pipeline's write stage)
  manifest.json                identities done / failed; only the driver writes it, after each
                               identity, as one atomic replace
  shards/part-<gen>-*.parquet  the product: kept images, dense `pid`, identities mixed across
                               shards; rewritten only when the set of finished identities changed
  shards/_shards.json          what the current shards hold (fingerprint, files, counts)
  config.yaml                  the resolved config

A killed run loses at most the identities in flight; a rerun skips everything in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from core.storage import Location, resolve
from core.shards import SHARD_SCHEMA, SHARDS_DIR, dense_labels
from factory.schema import STAGED_SCHEMA

MANIFEST_VERSION = 1
SHARDS_FORMAT = 2  # 2: identities mixed across shards, Hugging Face features metadata
SHARDS_INDEX = "_shards.json"
# Shards are cut from a window of this many shards' worth of rows, shuffled: each shard mixes the
# identities of the window, and the writer holds one window (not the dataset) in memory.
MIX_WINDOW_SHARDS = 4


def safe_file_stem(identity: str) -> str:
    """`market1501/12` -> `market1501__12`: identities become flat, portable file names."""
    return re.sub(r"[^A-Za-z0-9._-]+", "__", identity)


def staging_file(identity: str) -> str:
    """Where an identity's staging file lives, relative to DIR."""
    return f"staging/{safe_file_stem(identity)}.parquet"


def write_staged_identity(root: Location | str, identity: str, rows: pa.Table) -> str:
    """Write one identity's staged rows under `root` (atomically); returns the path relative to DIR.
    Runs on whichever worker finished the identity."""
    relative = staging_file(identity)
    (resolve(root) / relative).write_parquet(rows.cast(STAGED_SCHEMA))
    return relative


@dataclass
class FinalizeResult:
    identities: int
    images: int
    shards: list[str]  # URIs
    rewritten: bool = True


def huggingface_features(identity_names: list[str]) -> dict[str, Any]:
    """The `datasets` library's features of SHARD_SCHEMA, stored in each shard's Arrow metadata:
    `load_dataset("parquet", ...)` then yields `image` as an Image (a PIL image per row) and
    `pid` as a ClassLabel named by identity; Ray Data and pandas ignore the key."""
    dtypes = {pa.string(): "string", pa.int64(): "int64", pa.float64(): "float64"}
    values = {f.name: {"_type": "Value", "dtype": dtypes[f.type]} for f in list(SHARD_SCHEMA)[2:]}  # after image, pid
    return {"image": {"_type": "Image"}, "pid": {"_type": "ClassLabel", "names": identity_names}, **values}


class OutputStore:
    """Owns DIR. Workers write staging files and previews; the driver alone writes the manifest,
    so no two writers race on it."""

    def __init__(self, root: Location | str) -> None:
        self.root = resolve(root)
        self.manifest_path = self.root / "manifest.json"
        if self.root.is_local:
            self.root.makedirs()
        self.manifest = self._load_manifest()

    def _load_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"version": MANIFEST_VERSION, "identities": {}, "failed": {}}
        try:
            manifest = self.manifest_path.read_json()
        except json.JSONDecodeError as err:
            raise RuntimeError(f"{self.manifest_path} is not valid JSON ({err}); move it away to start over") from err
        if manifest.get("version") != MANIFEST_VERSION:
            raise RuntimeError(f"{self.manifest_path}: unsupported manifest version {manifest.get('version')}")
        # An identity counts as done only if its staging file is really there (one listing,
        # not a request per identity: object stores answer a listing of thousands at once).
        present = {location.path for location in (self.root / "staging").files(".parquet")}
        manifest["identities"] = {
            key: entry for key, entry in manifest["identities"].items() if (self.root / entry["file"]).path in present
        }
        return manifest

    @property
    def done(self) -> set[str]:
        return set(self.manifest["identities"])

    def record_identity(self, identity: str, summary: dict[str, Any], rows: pa.Table | None = None) -> None:
        """Record a finished identity whose staging file is written (by a worker, or here from
        `rows`): the file first, then the manifest entry pointing to it."""
        relative = write_staged_identity(self.root, identity, rows) if rows is not None else staging_file(identity)
        self.manifest["identities"][identity] = {"file": relative, **summary}
        self.manifest["failed"].pop(identity, None)
        self.manifest_path.write_json(self.manifest)

    def record_failure(self, identity: str, error: str, attempts: int) -> None:
        self.manifest["failed"][identity] = {"error": error, "attempts": attempts}
        self.manifest_path.write_json(self.manifest)

    def write_json(self, name: str, payload: Any) -> Location:
        location = self.root / name
        location.write_json(payload)
        return location

    def finalize(self, rows_per_shard: int, seed: int = 0) -> FinalizeResult:
        """Write `shards/` from staging: kept images only, `pid` dense over the identities with at
        least one kept image (in identity order), identities mixed across shards by a seeded
        shuffle. Streams one staging file at a time into a bounded window, so memory does not
        grow with the dataset. Left alone when the finished identities did not change."""
        return write_shards(self.root, self.manifest["identities"], rows_per_shard, seed)


def write_shards(root: Location | str, identities: dict[str, dict[str, Any]], rows_per_shard: int,
                 seed: int = 0) -> FinalizeResult:
    """`OutputStore.finalize` as a function of the manifest's identities (so a benchmark or a
    Ray task can run it in a process of its own)."""
    root = resolve(root)
    shards = root / SHARDS_DIR
    kept = [(key, identities[key]["file"], int(identities[key]["kept"]))
            for key in sorted(identities, key=_identity_sort_key) if int(identities[key]["kept"]) > 0]
    fingerprint = hashlib.sha256(json.dumps([SHARDS_FORMAT, rows_per_shard, seed, kept]).encode()).hexdigest()
    index = shards / SHARDS_INDEX
    previous = index.read_json() if index.exists() else None
    if previous and previous.get("fingerprint") == fingerprint and all((shards / f).exists() for f in previous["files"]):
        return FinalizeResult(previous["identities"], previous["images"], [(shards / f).uri for f in previous["files"]],
                              rewritten=False)

    names = [key for key, _, _ in kept]
    pid_of = dense_labels(names, order=_identity_sort_key)
    metadata = {b"huggingface": json.dumps({"info": {"features": huggingface_features(names)}}).encode()}
    schema = SHARD_SCHEMA.with_metadata(metadata)
    generation = fingerprint[:8]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(kept))  # drawn before any window's shuffle
    window_rows = MIX_WINDOW_SHARDS * rows_per_shard
    written: list[str] = []
    pending: list[pa.Table] = []
    pending_rows = images = 0

    # Not pyarrow.dataset.write_dataset(max_rows_per_file=...): each shard goes through
    # Location.write_parquet, the one atomic write on local disks and object stores alike.
    def flush(final: bool) -> None:
        nonlocal pending, pending_rows
        if not pending:
            return
        window = pa.concat_tables(pending)
        window = window.take(pa.array(rng.permutation(window.num_rows)))
        full = window.num_rows if final else window.num_rows - window.num_rows % rows_per_shard
        for start in range(0, full, rows_per_shard):
            name = f"part-{generation}-{len(written):05d}.parquet"
            (shards / name).write_parquet(window.slice(start, min(rows_per_shard, full - start)).replace_schema_metadata(metadata))
            written.append(name)
        rest = window.slice(full)
        pending, pending_rows = ([rest], rest.num_rows) if rest.num_rows else ([], 0)

    for position in order:
        key, relative, _ = kept[position]
        staged = (root / relative).read_parquet()
        rows = staged.filter(staged.column("kept")).drop_columns(["kept"]).sort_by("index")
        rows = rows.append_column("pid", pa.array([pid_of[key]] * rows.num_rows, pa.int64()))
        pending.append(rows.select(SHARD_SCHEMA.names).cast(schema))
        pending_rows += rows.num_rows
        images += rows.num_rows
        if pending_rows >= window_rows:
            flush(final=False)
    flush(final=True)

    index.write_json({"fingerprint": fingerprint, "files": written, "identities": len(kept), "images": images,
                      "rows_per_shard": rows_per_shard, "seed": seed, "format": SHARDS_FORMAT})
    # The new generation is complete and indexed: the old one goes (and any leftover of a
    # finalize killed midway, which the index never named).
    for location in shards.files(".parquet"):
        if location.name not in written:
            location.delete()
    return FinalizeResult(len(kept), images, [(shards / name).uri for name in written])


def _identity_sort_key(identity: str) -> tuple[str, int]:
    source, _, pid = identity.rpartition("/")
    return (source, int(pid))
