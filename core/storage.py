"""Every location a command reads or writes, as a URI: a local path, `file://`, `s3://`, `gs://`,
`hdfs://` (pyarrow.fs), or any other scheme fsspec knows (through pyarrow's `FSSpecHandler`).

Credentials come only from each filesystem's standard chain (`AWS_*`, `AWS_ENDPOINT_URL`, the
AWS profile; `GOOGLE_APPLICATION_CREDENTIALS`), never from a config. A `Location` pickles as its
URI, so a Ray worker resolves it on its own node with its own credentials.

Writes are atomic for readers: on a local filesystem a temporary file renamed into place; on an
object store one PUT (an object becomes visible only when its upload completes).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class StorageError(OSError):
    """A location cannot be resolved or read; the message names the URI."""


def has_scheme(location: str | os.PathLike[str]) -> bool:
    """`s3://b/x` and `file:///x` have one; `/x`, `x/y` and Windows' `C:\\x` do not."""
    text = os.fspath(location)
    return "://" in text and len(text.split("://", 1)[0]) > 1


@functools.lru_cache(maxsize=32)
def _filesystem(scheme: str, netloc: str) -> pafs.FileSystem:
    """One filesystem object per (scheme, bucket) and process: S3 resolves a bucket's region
    with a request, which every path of a run would otherwise repeat."""
    uri = f"{scheme}://{netloc}/"
    try:
        filesystem, _ = pafs.FileSystem.from_uri(uri)
        return filesystem
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as arrow_error:
        try:
            import fsspec
        except ImportError:
            raise StorageError(f"{uri}: pyarrow has no filesystem for {scheme!r} ({arrow_error})") from None
        try:
            return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme)))
        except (ImportError, ValueError) as err:
            raise StorageError(f"{uri}: neither pyarrow nor fsspec can open {scheme!r} ({err})") from None
    except OSError as err:
        raise StorageError(f"{uri}: {err}") from None


@dataclass(frozen=True)
class Location:
    """A file or folder on some filesystem. `uri` is what users see; `path` is the filesystem's."""

    uri: str
    filesystem: pafs.FileSystem
    path: str

    def __reduce__(self):  # travel as the URI: the receiving node resolves its own filesystem
        return (resolve, (self.uri,))

    def __str__(self) -> str:
        return self.uri

    def __truediv__(self, name: str) -> Location:
        name = str(name).strip("/")
        return Location(f"{self.uri.rstrip('/')}/{name}", self.filesystem, f"{self.path.rstrip('/')}/{name}")

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    @property
    def local_path(self) -> Path:
        """The path on this machine; only for local locations."""
        if not self.is_local:
            raise StorageError(f"{self.uri} is not on the local filesystem")
        return Path(self.path)

    # -- queries ---------------------------------------------------------------------------

    def _info(self, selector: pafs.FileSelector | None = None) -> Any:
        """`get_file_info` of this path (a `FileInfo`) or of `selector` (a list of them)."""
        try:
            return self.filesystem.get_file_info(selector or self.path)
        except OSError as err:
            raise StorageError(f"{self.uri}: {err}") from None

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def files(self, suffix: str = "", recursive: bool = False) -> list[Location]:
        """Files under this folder (sorted by path), skipping hidden and temporary names
        (`.x`, `_x`), as pyarrow.dataset does; [] when the folder does not exist."""
        return [location for location, _ in self.listing(suffix, recursive)]

    def listing(self, suffix: str = "", recursive: bool = False) -> list[tuple[Location, int]]:
        """`files` with each file's size, from the same single listing request."""
        infos = self._info(pafs.FileSelector(self.path, allow_not_found=True, recursive=recursive))
        base = self.path.rstrip("/")
        found = []
        for info in infos:
            relative = info.path[len(base):].lstrip("/")
            hidden = any(part.startswith((".", "_")) for part in relative.split("/"))
            if info.type == pafs.FileType.File and relative.endswith(suffix) and not hidden:
                found.append((self / relative, info.size))
        return sorted(found, key=lambda entry: entry[0].path)

    # -- reading ---------------------------------------------------------------------------

    def read_bytes(self) -> bytes:
        try:
            with self.filesystem.open_input_stream(self.path) as stream:
                return stream.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri} not found") from None
        except OSError as err:
            raise StorageError(f"{self.uri}: {err}") from None

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_json(self) -> Any:
        return json.loads(self.read_bytes())

    def read_parquet(self, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path, filesystem=self.filesystem, columns=columns)

    # -- writing ---------------------------------------------------------------------------

    def makedirs(self) -> None:
        self.filesystem.create_dir(self.path, recursive=True)

    def _write(self, write) -> None:
        """Run `write(stream)` so that readers see the old object or the whole new one."""
        if self.is_local:
            with atomic_local_path(self.path) as tmp, self.filesystem.open_output_stream(str(tmp)) as stream:
                write(stream)
            return
        with self.filesystem.open_output_stream(self.path) as stream:  # one object, one PUT
            write(stream)

    def write_bytes(self, data: bytes) -> None:
        self._write(lambda stream: stream.write(data))

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def write_json(self, payload: Any) -> None:
        self.write_bytes(json.dumps(payload, indent=1, sort_keys=True).encode())

    def write_parquet(self, table: pa.Table) -> None:
        self._write(lambda stream: pq.write_table(table, stream))

    def delete(self) -> None:
        with suppress(FileNotFoundError):
            self.filesystem.delete_file(self.path)

    def delete_dir(self) -> None:
        with suppress(FileNotFoundError):
            self.filesystem.delete_dir(self.path)


@contextmanager
def atomic_local_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary name beside `path` for a writer that wants a file name (safetensors, pandas,
    a stream); renamed onto `path` when the block ends without error, so a reader sees the old
    file or the whole new one, never half of one, and a failed write leaves nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def user_path(location: Location) -> Path | str:
    """How a command reports a location it wrote: a `Path` when local, else the URI."""
    return location.local_path if location.is_local else location.uri


@contextmanager
def local_folder(location: Location) -> Iterator[Path]:
    """A local folder to write `location`'s files into: the folder itself when local, else a
    temporary one copied to `location` on a clean exit (for writers that only take paths:
    matplotlib, pandas, safetensors)."""
    if location.is_local:
        location.local_path.mkdir(parents=True, exist_ok=True)
        yield location.local_path
        return
    with tempfile.TemporaryDirectory() as staging:
        yield Path(staging)
        for path in sorted(Path(staging).rglob("*")):
            if path.is_file():
                (location / path.relative_to(staging).as_posix()).write_bytes(path.read_bytes())


def cache_dir(kind: str) -> Path:
    """This machine's cache for `kind` (`files`, `sources`, `models`, ...):
    `$XDG_CACHE_HOME/reid-factory/<kind>`, else `~/.cache/reid-factory/<kind>`. Node-local on a
    cluster: each node fills its own."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "reid-factory" / kind


def _cache_key(location: Location) -> str:
    return hashlib.sha256(location.uri.encode()).hexdigest()[:16]


def local_file(location: Location, cache: Path | None = None) -> Path:
    """A path on this machine holding `location`'s bytes: the file itself when local, else a copy
    under `cache` (default `cache_dir("files")`), fetched once per machine and URI."""
    if location.is_local:
        return location.local_path
    target = (cache or cache_dir("files")) / _cache_key(location) / location.name
    if not target.is_file():
        resolve(target).write_bytes(location.read_bytes())
    return target


def mirror_folder(location: Location, cache: Path | None = None) -> Path:
    """A local folder holding the files under `location`: the folder itself when local, else a
    copy under `cache` (default `cache_dir("folders")`) kept in step by one listing: files already
    there with the listed size are not fetched again. Each file lands atomically, so processes of
    one node mirroring the same folder at once cannot see a half-written file."""
    if location.is_local:
        return location.local_path
    target = (cache or cache_dir("folders")) / _cache_key(location)
    files = location.listing(recursive=True)  # sizes from the listing: no request per file
    if not files:
        raise StorageError(f"{location.uri} holds no files")
    prefix = len(location.path.rstrip("/")) + 1
    for file, size in files:
        local = target / file.path[prefix:]
        if not (local.is_file() and local.stat().st_size == size):
            resolve(local).write_bytes(file.read_bytes())
    return target


def resolve(location: str | os.PathLike[str] | Location) -> Location:
    """The `Location` of a URI or path. A local path becomes absolute against the current
    directory (so it means the same thing after the process changes directory)."""
    if isinstance(location, Location):
        return location
    text = os.fspath(location)
    if not text:
        raise StorageError("empty location")
    parsed = urlparse(text) if has_scheme(text) else None
    if parsed is None or parsed.scheme.lower() == "file":
        path = str(Path(text if parsed is None else parsed.path).expanduser().resolve())
        return Location(path, pafs.LocalFileSystem(), path)
    filesystem = _filesystem(parsed.scheme.lower(), parsed.netloc)
    if isinstance(filesystem, pafs.PyFileSystem):  # fsspec names paths its own way
        path = filesystem.handler.fs._strip_protocol(text).rstrip("/")
    else:
        path = f"{parsed.netloc}{parsed.path}".rstrip("/")
    return Location(text.rstrip("/"), filesystem, path)


def is_remote(location: str | os.PathLike[str]) -> bool:
    """A URI whose scheme is not `file`: it may be read from any node."""
    return has_scheme(location) and not os.fspath(location).lower().startswith("file://")
