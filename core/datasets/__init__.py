"""Source dataset adapters: every Re-ID dataset becomes a `ReidDataset` of `ImageRecord`s.

`load_source(SourceConfig)` picks the adapter by kind from `SOURCES` (`core.datasets.registry`);
each built-in adapter registers itself in its module, all imported here, so the registry is
complete whenever this package is. The synthetic generator lives in `core.datasets.synthetic`
and is imported on demand (it is also a `python -m` CLI).
"""

from core.datasets.airport import load_airport
from core.datasets.base import DatasetError, ImageRecord, ReidDataset
from core.datasets.config import SourceConfig, SyntheticSpec
from core.datasets.cuhk03 import load_cuhk03
from core.datasets.generic import load_csv, load_folder
from core.datasets.market import load_market1501
from core.datasets.msmt17 import load_msmt17
from core.datasets.registry import SOURCES, SourceAdapter, load_source

__all__ = [
    "DatasetError",
    "ImageRecord",
    "ReidDataset",
    "SOURCES",
    "SourceAdapter",
    "SourceConfig",
    "SyntheticSpec",
    "load_airport",
    "load_csv",
    "load_cuhk03",
    "load_folder",
    "load_market1501",
    "load_msmt17",
    "load_source",
]
