"""Source dataset adapters: every Re-ID dataset becomes a `ReidDataset` of `ImageRecord`s.

`load_source(SourceConfig)` picks the adapter by kind. The synthetic generator lives in
`factory.datasets.synthetic` and is imported on demand (it is also a `python -m` CLI).
"""

from factory.datasets.airport import load_airport
from factory.datasets.base import DatasetError, ImageRecord, ReidDataset, Split, confined_path
from factory.datasets.config import SourceConfig, SyntheticSpec
from factory.datasets.cuhk03 import load_cuhk03
from factory.datasets.generic import load_csv, load_folder
from factory.datasets.market import load_market1501
from factory.datasets.msmt17 import load_msmt17
from factory.datasets.registry import SOURCE_LOADERS, load_source

__all__ = [
    "SOURCE_LOADERS",
    "DatasetError",
    "ImageRecord",
    "ReidDataset",
    "SourceConfig",
    "Split",
    "SyntheticSpec",
    "confined_path",
    "load_airport",
    "load_csv",
    "load_cuhk03",
    "load_folder",
    "load_market1501",
    "load_msmt17",
    "load_source",
]
