"""Models the config names by a local path on the driver, made loadable on every node.

A hub id resolves on each node (its own Hugging Face cache) and a URI is mirrored once per node
(`locate.local_model`). A local folder exists only on the driver's machine unless the cluster
shares a filesystem, so the driver packs it once into Ray's object store (`ModelFolders.ship`)
and an actor that cannot see the same folder unpacks it into its node's cache
(`ModelFolders.open`), once per node; later actors find it there. The demo's tiny models are
about 5 MB; a full Stable Diffusion folder is better given as a hub id or a URI.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.storage import cache_dir, has_scheme
from factory.models.locate import _looks_like_path


def folder_fingerprint(folder: Path) -> str:
    """A digest of the folder's file names, sizes and modification times: equal on a node that
    sees the very same folder (a shared filesystem, or the driver's own machine)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _pack(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def _unpack(files: Mapping[str, bytes], target: Path) -> None:
    """Write `files` into `target` as a whole: into a private folder renamed into place, so an
    actor on the same node never loads a half-written model."""
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    for relative, data in files.items():
        path = staging / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    try:
        os.rename(staging, target)
    except OSError:  # another actor of this node unpacked it first
        shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class PackedFolder:
    """A driver-local model folder in Ray's object store."""

    origin: str  # the folder on the driver, absolute
    fingerprint: str
    files: Any  # ray.ObjectRef of {relative path: bytes}; fetched only where the folder is not visible


@dataclass(frozen=True)
class ModelFolders:
    """What an actor needs to open the run's models on its own node (it travels with the stage's
    constructor arguments): the packed driver-local folders, by the model id the config gives."""

    packed: Mapping[str, PackedFolder] = field(default_factory=dict)

    @classmethod
    def ship(cls, model_ids: Iterable[str]) -> ModelFolders:
        """Driver side, with Ray initialised: pack each model id that is a local folder, once."""
        import ray

        packed = {}
        for model_id in dict.fromkeys(model_ids):
            if has_scheme(model_id) or not _looks_like_path(model_id):
                continue  # a URI or a hub id: each node resolves it itself
            folder = Path(model_id).expanduser().resolve()
            if folder.is_dir():
                packed[model_id] = PackedFolder(str(folder), folder_fingerprint(folder), ray.put(_pack(folder)))
        return cls(packed)

    def open(self, model_id: str) -> str:
        """Actor side: the id to load `model_id` by on this node. A packed folder is used in place
        when this node sees the same folder, else unpacked into `cache_dir("models")` once."""
        packed = self.packed.get(model_id)
        if packed is None:
            return model_id
        origin = Path(packed.origin)
        if origin.is_dir() and folder_fingerprint(origin) == packed.fingerprint:
            return str(origin)
        target = cache_dir("models") / f"shipped-{packed.fingerprint}"
        if not target.is_dir():
            import ray

            target.parent.mkdir(parents=True, exist_ok=True)
            _unpack(ray.get(packed.files), target)
        return str(target)
