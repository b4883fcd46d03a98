"""`load_source`: one `SourceConfig` in, one `ReidDataset` out, looked up by `config.kind`."""

from __future__ import annotations

from collections.abc import Callable

from factory.datasets.airport import load_airport
from factory.datasets.base import ReidDataset
from factory.datasets.config import SourceConfig, SourceKind, SyntheticSpec
from factory.datasets.cuhk03 import load_cuhk03
from factory.datasets.generic import load_csv, load_folder
from factory.datasets.market import load_market1501
from factory.datasets.msmt17 import load_msmt17

SourceLoader = Callable[[SourceConfig], ReidDataset]


def _load_synthetic(config: SourceConfig) -> ReidDataset:
    """Generate the procedural dataset into `root` when absent, then read it as Market-1501."""
    # Imported here so `python -m factory.datasets.synthetic` does not find its own module
    # already imported by the package (runpy warns about that), and PIL stays off other paths.
    from factory.datasets.synthetic import ensure_synthetic_dataset

    ensure_synthetic_dataset(config.root, config.generate or SyntheticSpec())
    return load_market1501(config.root, source=config.source_name)


SOURCE_LOADERS: dict[SourceKind, SourceLoader] = {
    "market1501": lambda c: load_market1501(c.root, source=c.source_name),
    "cuhk03": lambda c: load_cuhk03(c.root, variant=c.variant, source=c.source_name),
    "msmt17": lambda c: load_msmt17(c.root, variant=c.variant, source=c.source_name),
    "airport": lambda c: load_airport(c.root, list_file=c.list_file, source=c.source_name),
    "folder": lambda c: load_folder(c.root, source=c.source_name),
    "csv": lambda c: load_csv(c.root, list_file=c.list_file, source=c.source_name),
    "synthetic": _load_synthetic,
}


def load_source(config: SourceConfig) -> ReidDataset:
    """Read the source dataset `config` describes; every record carries `config.source_name`.

    Raises `DatasetError` naming the path when the data is missing, malformed or empty.
    """
    return SOURCE_LOADERS[config.kind](config)
