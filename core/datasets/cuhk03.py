"""CUHK03-NP adapter (the "new protocol" split of Zhong et al., in the Market layout).

Layout under `root`::

    labeled/{bounding_box_train,query,bounding_box_test}/0001_c1_1.png
    detected/{bounding_box_train,query,bounding_box_test}/...

`variant` picks `labeled` (default, hand-drawn boxes) or `detected` (DPM boxes). Names parse with
the Market rule: `0001_c1_1.png` -> pid 1, camid 0, frame 1 (the trailing image index).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from core.datasets.base import DatasetError, ReidDataset
from core.datasets.market import load_market1501
from core.datasets.registry import SOURCES, SourceAdapter

if TYPE_CHECKING:
    from core.datasets.config import SourceConfig

CUHK03_VARIANTS = ("labeled", "detected")


def load_cuhk03(root: Path, variant: str | None = None, source: str = "cuhk03") -> ReidDataset:
    """Read CUHK03-NP `variant` (`labeled` when None) from `root`."""
    chosen = variant or "labeled"
    if chosen not in CUHK03_VARIANTS:
        raise DatasetError(f"{root}: CUHK03 variant must be one of {list(CUHK03_VARIANTS)}, got {variant!r}")
    root = Path(root)
    return load_market1501(root, source, layout_dir=root / chosen)


@SOURCES.register("cuhk03")
class Cuhk03Source(SourceAdapter):
    variants = CUHK03_VARIANTS

    def load(self, config: SourceConfig) -> ReidDataset:
        return load_cuhk03(Path(config.root), variant=config.variant, source=config.source_name)
