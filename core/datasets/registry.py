"""`load_source`: one `SourceConfig` in, one `ReidDataset` out, looked up by `config.kind`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from core.storage import cache_dir, is_remote, mirror_folder, resolve
from core.datasets.airport import load_airport
from core.datasets.base import DatasetError, ReidDataset
from core.datasets.config import SourceConfig, SourceKind, SyntheticSpec
from core.datasets.cuhk03 import load_cuhk03
from core.datasets.generic import load_csv, load_folder
from core.datasets.market import load_market1501
from core.datasets.msmt17 import load_msmt17

SourceLoader = Callable[[SourceConfig], ReidDataset]


def _load_synthetic(config: SourceConfig) -> ReidDataset:
    """Generate the procedural dataset into `root` when absent, then read it as Market-1501."""
    # Imported here so `python -m core.datasets.synthetic` does not find its own module
    # already imported by the package (runpy warns about that), and PIL stays off other paths.
    from core.datasets.synthetic import ensure_synthetic_dataset

    ensure_synthetic_dataset(config.root, config.generate or SyntheticSpec())
    return load_market1501(config.root, source=config.source_name)


SOURCE_LOADERS: dict[SourceKind, SourceLoader] = {
    "market1501": lambda c: load_market1501(Path(c.root), source=c.source_name),
    "cuhk03": lambda c: load_cuhk03(Path(c.root), variant=c.variant, source=c.source_name),
    "msmt17": lambda c: load_msmt17(Path(c.root), variant=c.variant, source=c.source_name),
    "airport": lambda c: load_airport(Path(c.root), list_file=c.list_file, source=c.source_name),
    "folder": lambda c: load_folder(Path(c.root), source=c.source_name),
    "csv": lambda c: load_csv(Path(c.root), list_file=c.list_file, source=c.source_name),
    "synthetic": _load_synthetic,
}


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
    return SOURCE_LOADERS[config.kind](fetch_source(config))
