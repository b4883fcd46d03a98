"""Market-1501 adapter (also the reader of every dataset in the Market layout).

Layout under `root`::

    bounding_box_train/   training images          -> split "train"
    query/                query images             -> split "query"
    bounding_box_test/    gallery images           -> split "gallery"

File names follow `PPPP_cCsS_FFFFFF_NN.jpg` (`0002_c1s1_000451_03.jpg`: pid 2, camera 1 -> camid
0, sequence 1, frame 451), parsed as in fast-reid with `([-\\d]+)_c(\\d)`. Junk (`-1_...`) is
dropped; distractors (`0000_...`) are kept in query/gallery flagged `distractor=True` and dropped
from train. Every malformed name and every symlink escaping `root` is reported in one error.

The `synthetic` source is registered here too: the procedural dataset, generated into `root`
when absent (`core.datasets.synthetic`), then read in this layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from core.datasets.base import ImageRecord, ReidDataset, Split, require_dir
from core.datasets.config import SourceConfig, SyntheticSpec
from core.datasets.generic import ProblemCollector, assemble, folder_images, image_record
from core.datasets.registry import SOURCES, SourceAdapter

MARKET_SPLIT_DIRS: dict[Split, str] = {
    "train": "bounding_box_train",
    "query": "query",
    "gallery": "bounding_box_test",
}


def _market_records(
    root: Path, layout_dir: Path, source: str, problems: ProblemCollector
) -> Iterator[ImageRecord | None]:
    """Records of the three Market-layout folders; `root` is the confinement root of the paths.

    Per-image problems go to `problems` (the caller raises them all at the end of the load).
    """
    for split, folder in MARKET_SPLIT_DIRS.items():
        for image in folder_images(root, layout_dir / folder, f"{source} {split} folder"):
            yield problems.check(image_record, root, image, split, source)


def load_market1501(root: Path, source: str = "market1501", layout_dir: Path | None = None) -> ReidDataset:
    """Read Market-1501 (or any dataset in its layout, e.g. the synthetic one) from `root`: the
    three Market folders found in `layout_dir` (default `root`)."""
    root = require_dir(Path(root), f"{source} dataset root")
    layout_dir = root if layout_dir is None else require_dir(layout_dir, f"{source} folder")
    problems = ProblemCollector(source)
    return assemble(problems, root, _market_records(root, layout_dir, source, problems), layout_dir)


@SOURCES.register("market1501")
class Market1501Source(SourceAdapter):
    def load(self, config: SourceConfig) -> ReidDataset:
        return load_market1501(Path(config.root), source=config.source_name)


@SOURCES.register("synthetic")
class SyntheticSource(SourceAdapter):
    """The procedural dataset: generated into `root` from `generate` when absent, then read as
    Market-1501."""

    accepts_generate = True
    local_root_only = True

    def load(self, config: SourceConfig) -> ReidDataset:
        # Imported here so `python -m core.datasets.synthetic` does not find its own module
        # already imported by the package (runpy warns about that), and PIL stays off other paths.
        from core.datasets.synthetic import ensure_synthetic_dataset

        ensure_synthetic_dataset(config.root, config.generate or SyntheticSpec())
        return load_market1501(config.root, source=config.source_name)
