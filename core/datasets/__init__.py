"""Source dataset adapters: every Re-ID dataset becomes a `ReidDataset` of `ImageRecord`s.

`load_source(SourceConfig)` picks the adapter by kind from `SOURCES` (`core.datasets.registry`);
each built-in adapter registers itself in its module, all imported here, so the registry is
complete whenever this package is. The synthetic generator lives in `core.datasets.synthetic`
and is imported on demand (it is also a `python -m` CLI).
"""

from core.datasets.airport import load_airport
from core.datasets.base import DatasetError, ImageRecord, ReidDataset
from core.datasets.config import SourceConfig, SyntheticSpec
from core.datasets.cuhk02 import load_cuhk02
from core.datasets.cuhk03 import load_cuhk03
from core.datasets.cuhk_sysu import load_cuhk_sysu
from core.datasets.generic import load_csv, load_folder
from core.datasets.grid import load_grid
from core.datasets.ilids import load_ilids
from core.datasets.market import load_market1501
from core.datasets.msmt17 import load_msmt17
from core.datasets.personx import load_personx
from core.datasets.prid import load_prid
from core.datasets.registry import SOURCES, SourceAdapter, load_source
# the split functions stay in their module: re-exported here, `test_splits` the function would
# hide `core.datasets.test_splits` the module
from core.datasets.test_splits import TestProtocol, protocol_for
from core.datasets.viper import load_viper

__all__ = [
    "DatasetError",
    "ImageRecord",
    "ReidDataset",
    "SOURCES",
    "SourceAdapter",
    "SourceConfig",
    "SyntheticSpec",
    "TestProtocol",
    "load_airport",
    "load_csv",
    "load_cuhk02",
    "load_cuhk03",
    "load_cuhk_sysu",
    "load_folder",
    "load_grid",
    "load_ilids",
    "load_market1501",
    "load_msmt17",
    "load_personx",
    "load_prid",
    "load_source",
    "load_viper",
    "protocol_for",
]
