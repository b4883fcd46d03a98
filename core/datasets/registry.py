"""Source adapters by kind: `SOURCES` maps a `sources[].kind` to its `SourceAdapter`, and
`load_source` reads one `SourceConfig` into one `ReidDataset` through it.

A new dataset layout is one class, registered once where it is defined::

    @SOURCES.register("mylayout")
    class MyLayout(SourceAdapter):
        def load(self, config: SourceConfig) -> ReidDataset: ...

`SourceConfig` validates `kind` and the kind's options (`variant`, `generate`, a remote root)
against the registered class, so a layout registered by a user's module is accepted by the same
config key as a built-in one. The built-in adapters register themselves in their modules, which
`core.datasets` imports: the registry is complete whenever the package is imported. This module
imports no adapter (they import it), so `core.datasets.config` validates without an import cycle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from core.datasets.base import DatasetError, ReidDataset
from core.registry import Registry
from core.storage import cache_dir, is_remote, mirror_folder, resolve

if TYPE_CHECKING:
    from core.datasets.config import SourceConfig
    from core.datasets.test_splits import TestProtocol


class SourceAdapter(ABC):
    """How one kind of source dataset is read. The class attributes are what `SourceConfig`
    checks a `sources:` entry of this kind against."""

    variants: ClassVar[tuple[str, ...]] = ()  # the `variant` values it reads; empty: it takes none
    accepts_generate: ClassVar[bool] = False  # `generate:` applies (the data is generated into `root` first)
    local_root_only: ClassVar[bool] = False  # it writes into `root`, so a URI (fetched, read-only) is refused
    # how the DG literature draws query/gallery from it (`core.datasets.test_splits`); None: it has its own
    test_protocol: ClassVar[TestProtocol | None] = None

    @abstractmethod
    def load(self, config: SourceConfig) -> ReidDataset:
        """Read the dataset at `config.root` (a local folder by now); records carry `config.source_name`."""


SOURCES: Registry[type[SourceAdapter]] = Registry("source", "sources[].kind")


def fetch_source(config: SourceConfig, cache: Path | None = None) -> SourceConfig:
    """`config` with a remote root (s3://, gs://, ...) replaced by a local copy, fetched once per
    machine into `cache` (default ~/.cache/reid-factory/sources/<hash of the URI>; files already
    there with the same size are kept). The driver reads the images once; they travel to the
    workers as bytes, so no node but this one ever reads the source."""
    if not is_remote(config.root):
        return config
    location = resolve(config.root)
    try:
        target = mirror_folder(location, cache or cache_dir("sources"))
    except OSError as err:
        raise DatasetError(f"{config.source_name} dataset root {location}: {err}") from None
    list_file = config.list_file
    if list_file is not None and is_remote(list_file):
        listed = resolve(list_file)
        if not listed.path.startswith(location.path.rstrip("/") + "/"):
            raise DatasetError(f"{config.source_name}: list_file {listed} must lie under root {location}")
        list_file = str(target / listed.path[len(location.path.rstrip("/")) + 1:])
    return config.model_copy(update={"root": str(target), "list_file": list_file})


def load_source(config: SourceConfig) -> ReidDataset:
    """Read the source dataset `config` describes; every record carries `config.source_name`.

    A remote root is fetched once into the local cache first (`fetch_source`). Raises
    `DatasetError` naming the path when the data is missing, malformed or empty.
    """
    return SOURCES.get(config.kind)().load(fetch_source(config))
