"""The output directory: per-identity staging files, the manifest, and the final shards.

Layout of DIR:
  staging/<identity>.parquet   every generated image of one identity (kept or not), written
                               atomically the moment the identity finishes
  manifest.json                identities done / failed, rewritten atomically after each one
  shards/part-*.parquet        the product: kept images, dense `pid`; rebuilt from staging at
                               the end of every run and swapped in as a whole directory
  config.yaml                  the resolved config

A killed run loses at most the identities in flight; a rerun skips everything in the manifest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from factory.schema import SHARD_SCHEMA, STAGED_SCHEMA

MANIFEST_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def safe_file_stem(identity: str) -> str:
    """`market1501/12` -> `market1501__12`: identities become flat, portable file names."""
    return re.sub(r"[^A-Za-z0-9._-]+", "__", identity)


@dataclass
class FinalizeResult:
    identities: int
    images: int
    shards: list[Path]


class OutputStore:
    """Owns DIR. Only the driver writes here, so no two writers race on the manifest."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.staging = self.root / "staging"
        self.shards = self.root / "shards"
        self.manifest_path = self.root / "manifest.json"
        self.root.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(exist_ok=True)
        self.manifest = self._load_manifest()

    def _load_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"version": MANIFEST_VERSION, "identities": {}, "failed": {}}
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise RuntimeError(f"{self.manifest_path} is not valid JSON ({err}); move it away to start over") from err
        if manifest.get("version") != MANIFEST_VERSION:
            raise RuntimeError(f"{self.manifest_path}: unsupported manifest version {manifest.get('version')}")
        # An identity counts as done only if its staging file is really there.
        manifest["identities"] = {
            key: entry for key, entry in manifest["identities"].items() if (self.root / entry["file"]).exists()
        }
        return manifest

    def _save_manifest(self) -> None:
        atomic_write_bytes(self.manifest_path, json.dumps(self.manifest, indent=1, sort_keys=True).encode())

    @property
    def done(self) -> set[str]:
        return set(self.manifest["identities"])

    def record_identity(self, identity: str, rows: pa.Table, summary: dict[str, Any]) -> None:
        """Stage one finished identity: its file first, then the manifest entry pointing to it."""
        rows = rows.cast(STAGED_SCHEMA)
        path = self.staging / f"{safe_file_stem(identity)}.parquet"
        atomic_write_parquet(rows, path)
        self.manifest["identities"][identity] = {"file": str(path.relative_to(self.root)), **summary}
        self.manifest["failed"].pop(identity, None)
        self._save_manifest()

    def record_failure(self, identity: str, error: str, attempts: int) -> None:
        self.manifest["failed"][identity] = {"error": error, "attempts": attempts}
        self._save_manifest()

    def write_json(self, name: str, payload: Any) -> Path:
        path = self.root / name
        atomic_write_bytes(path, json.dumps(payload, indent=1, sort_keys=True).encode())
        return path

    def finalize(self, rows_per_shard: int) -> FinalizeResult:
        """Rebuild `shards/` from staging: kept images only, identities in key order, `pid` dense
        over identities with at least one kept image. Swapped in as a whole directory."""
        tables = []
        for identity in sorted(self.manifest["identities"], key=_identity_sort_key):
            staged = pq.read_table(self.root / self.manifest["identities"][identity]["file"])
            kept = staged.filter(staged.column("kept"))
            if kept.num_rows:
                tables.append(kept)
        pid_tables = []
        for pid, table in enumerate(tables):
            table = table.drop_columns(["kept"]).sort_by("index")
            table = table.append_column("pid", pa.array([pid] * table.num_rows, pa.int64()))
            pid_tables.append(table.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA))
        combined = pa.concat_tables(pid_tables) if pid_tables else SHARD_SCHEMA.empty_table()

        tmp = self.root / f".shards.{uuid.uuid4().hex}.tmp"
        tmp.mkdir()
        shard_names = []
        for number, start in enumerate(range(0, max(combined.num_rows, 1), rows_per_shard)):
            if combined.num_rows == 0:
                break
            name = f"part-{number:05d}.parquet"
            pq.write_table(combined.slice(start, rows_per_shard), tmp / name)
            shard_names.append(name)
        old = self.root / f".shards.{uuid.uuid4().hex}.old"
        if self.shards.exists():
            os.replace(self.shards, old)
        os.replace(tmp, self.shards)
        shutil.rmtree(old, ignore_errors=True)
        return FinalizeResult(len(pid_tables), combined.num_rows, [self.shards / n for n in shard_names])


def _identity_sort_key(identity: str) -> tuple[str, int]:
    source, _, pid = identity.rpartition("/")
    return (source, int(pid))
