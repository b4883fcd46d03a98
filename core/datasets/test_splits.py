"""Random query/gallery splits of a dataset for testing: the small-dataset protocol of the
domain-generalization (DG) literature (DualNorm, MetaBIN, as torchreid prepares VIPeR, PRID, GRID
and QMUL i-LIDS), and a resampling of the test pool for datasets with their own query/gallery.

A small dataset is read whole into `train` by its adapter (it is a DG training source as it is);
its adapter's `test_protocol` says how a test split is drawn from it:

- `test_ids` identities are drawn at random among the eligible ones: those with an image a query
  may be taken from (a query camera, or a query folder) and another image the gallery may hold;
- their query-side images become the query, their gallery-side images the gallery (with
  `one_image_per_id`, one random query image and one random gallery image, from another camera
  when the identity has one; its other images are left out of the split, as in torchreid);
- identities seen only on the gallery side, and distractors, always join the gallery;
- every other identity (not drawn, or never on the gallery side) is the split's `train`.

When `test_ids` exceeds the eligible identities (a small fixture), half of them are drawn, at least
one. The standard numbers: VIPeR 316 of 632 (query cam_a, gallery cam_b); PRID 100 of the 200
seen by both cameras (the 549 cam_b-only identities always in the gallery); GRID 125 of the 250
paired (query probe/, gallery gallery/, the 775 distractors always in the gallery); i-LIDS 60 of
119 with one query and one gallery image each.

`protocol=None` (datasets with their own query/gallery, e.g. the Market layout or `synthetic`):
the test pool (query + gallery) is resampled. Every non-distractor identity seen by at least two
cameras gives one random image to the query; the rest of the pool, distractors included, is the
gallery; `train` is untouched. Every query then has a true match from another camera.

Splits are deterministic per (seed, split index): `numpy.random.default_rng([seed, index])`, and
records are sorted by path first, so the order an adapter listed them in does not matter.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from core.datasets.base import DatasetError, ImageRecord, ReidDataset, Split
from core.datasets.registry import SOURCES


@dataclass(frozen=True)
class TestProtocol:
    """How the DG literature splits a small dataset for testing (DualNorm / MetaBIN protocol).

    An image's side is given by its camera (`query_cameras` / `gallery_cameras`) or, for datasets
    whose query and gallery folders mix the same cameras (GRID's probe/ and gallery/), by the name
    of the folder holding it (`query_folders` / `gallery_folders`). With neither, any image may
    serve either side, which only makes sense with `one_image_per_id` (i-LIDS).
    """

    __test__: ClassVar[bool] = False  # a library class, not a pytest test class

    test_ids: int  # identities drawn at random for testing (from those eligible: seen on both sides)
    query_cameras: tuple[int, ...] = ()
    gallery_cameras: tuple[int, ...] = ()
    one_image_per_id: bool = False  # i-LIDS: one query and one gallery image per test identity
    query_folders: tuple[str, ...] = ()
    gallery_folders: tuple[str, ...] = ()
    # identities seen only on the gallery side, and distractors, always join the gallery

    def __post_init__(self) -> None:
        if self.test_ids < 1:
            raise ValueError(f"test_ids must be >= 1, got {self.test_ids}")
        for what, query, gallery in (
            ("cameras", self.query_cameras, self.gallery_cameras),
            ("folders", self.query_folders, self.gallery_folders),
        ):
            if bool(query) != bool(gallery):
                raise ValueError(f"give both query_{what} and gallery_{what}, or neither")
            if set(query) & set(gallery):
                raise ValueError(f"query_{what} and gallery_{what} overlap: {sorted(set(query) & set(gallery))}")
        if self.query_cameras and self.query_folders:
            raise ValueError("choose sides by cameras or by folders, not both")
        if not (self.query_cameras or self.query_folders or self.one_image_per_id):
            raise ValueError("without query/gallery cameras or folders, one_image_per_id must be set")

    def sides(self, record: ImageRecord) -> tuple[bool, bool]:
        """(may be a query, may be in the gallery) for one image."""
        if self.query_folders:
            folder = Path(record.path).parent.name
            return folder in self.query_folders, folder in self.gallery_folders
        if self.query_cameras:
            return record.camid in self.query_cameras, record.camid in self.gallery_cameras
        return True, True

    def describe(self) -> str:
        if self.query_folders:
            return f"query folders {list(self.query_folders)}, gallery folders {list(self.gallery_folders)}"
        if self.query_cameras:
            return f"query cameras {list(self.query_cameras)}, gallery cameras {list(self.gallery_cameras)}"
        return "one query and one gallery image per identity, from any camera"


def protocol_for(kind: str) -> TestProtocol | None:
    """The test protocol of a registered source kind (its adapter's `test_protocol`); None for
    datasets with their own query/gallery."""
    return SOURCES.get(kind).test_protocol


def test_split(dataset: ReidDataset, protocol: TestProtocol | None, seed: int, index: int = 0) -> ReidDataset:
    """Split number `index` of `dataset` for testing under `protocol` (see the module docstring).

    Returns a new `ReidDataset` whose records carry their split in the new dataset. Raises
    `DatasetError` when no identity is eligible for testing.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng([seed, index])
    if protocol is None:
        return _resample_test_pool(dataset, rng)
    return _protocol_split(dataset, protocol, rng)


def test_splits(dataset: ReidDataset, protocol: TestProtocol | None, seed: int, count: int = 10) -> list[ReidDataset]:
    """`count` splits (index 0 .. count-1) of `dataset`; results are averaged over them."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    return [test_split(dataset, protocol, seed, index) for index in range(count)]


# pytest would collect these library functions as tests wherever they are imported by name
test_split.__test__ = False  # type: ignore[attr-defined]
test_splits.__test__ = False  # type: ignore[attr-defined]


def _by_path(records: Iterable[ImageRecord]) -> list[ImageRecord]:
    return sorted(records, key=lambda r: r.path)


def _by_identity(records: list[ImageRecord]) -> dict[int, list[ImageRecord]]:
    grouped: dict[int, list[ImageRecord]] = defaultdict(list)
    for record in records:
        grouped[record.pid].append(record)
    return dict(sorted(grouped.items()))


def _moved(records: Iterable[ImageRecord], split: Split) -> list[ImageRecord]:
    return [r if r.split == split else dataclasses.replace(r, split=split) for r in records]


def _pick(rng: np.random.Generator, records: list[ImageRecord]) -> ImageRecord:
    return records[int(rng.integers(len(records)))]


def _split_dataset(
    dataset: ReidDataset, train: list[ImageRecord], query: list[ImageRecord], gallery: list[ImageRecord]
) -> ReidDataset:
    return ReidDataset(
        name=dataset.name, root=dataset.root,
        train=_moved(train, "train"), query=_moved(query, "query"), gallery=_moved(gallery, "gallery"),
    )


def _resample_test_pool(dataset: ReidDataset, rng: np.random.Generator) -> ReidDataset:
    pool = _by_path(dataset.query + dataset.gallery)
    gallery = [r for r in pool if r.distractor]
    query: list[ImageRecord] = []
    for images in _by_identity([r for r in pool if not r.distractor]).values():
        if len({r.camid for r in images}) < 2:
            gallery += images  # no cross-camera match possible: gallery only
            continue
        chosen = _pick(rng, images)
        query.append(chosen)
        gallery += [r for r in images if r is not chosen]
    if not query:
        raise DatasetError(
            f"{dataset.name}: no identity is eligible for testing: none of the query/gallery identities "
            f"({len(pool)} images) is seen by two cameras"
        )
    return _split_dataset(dataset, list(dataset.train), query, _by_path(gallery))


def _test_count(wanted: int, eligible: int) -> int:
    """`wanted`, or half of the eligible identities (at least one) when fewer are available."""
    return wanted if wanted <= eligible else max(1, eligible // 2)


def _protocol_split(dataset: ReidDataset, protocol: TestProtocol, rng: np.random.Generator) -> ReidDataset:
    records = _by_path(dataset.train + dataset.query + dataset.gallery)
    gallery = [r for r in records if r.distractor]
    identities = _by_identity([r for r in records if not r.distractor])
    # per identity: (images that may be a query, images the gallery may hold)
    sides = {
        pid: ([r for r in images if protocol.sides(r)[0]], [r for r in images if protocol.sides(r)[1]])
        for pid, images in identities.items()
    }
    eligible = [pid for pid, (queries, galleries) in sides.items() if _has_pair(queries, galleries)]
    if not eligible:
        raise DatasetError(
            f"{dataset.name}: no identity is eligible for testing ({protocol.describe()}): none of "
            f"{len(identities)} identities has a query image and another image for the gallery"
        )
    drawn = rng.choice(len(eligible), size=_test_count(protocol.test_ids, len(eligible)), replace=False)
    tested = {eligible[i] for i in drawn}
    train: list[ImageRecord] = []
    query: list[ImageRecord] = []
    for pid, images in identities.items():
        queries, galleries = sides[pid]
        if pid in tested and protocol.one_image_per_id:
            chosen_query, chosen_gallery = _one_pair(rng, queries, galleries)
            query.append(chosen_query)
            gallery.append(chosen_gallery)
        elif pid in tested:
            query += queries
            gallery += galleries
        elif galleries and not queries:
            gallery += galleries  # seen only by the gallery: a distractor-like identity of the gallery
        else:
            train += images
    return _split_dataset(dataset, train, query, _by_path(gallery))


def _has_pair(queries: list[ImageRecord], galleries: list[ImageRecord]) -> bool:
    """Whether some query image has a different image on the gallery side."""
    return any(g is not q for q in queries for g in galleries)


def _one_pair(
    rng: np.random.Generator, queries: list[ImageRecord], galleries: list[ImageRecord]
) -> tuple[ImageRecord, ImageRecord]:
    """One random query image and one random other gallery image, from another camera when the
    identity has one there."""
    query = _pick(rng, [q for q in queries if any(g is not q for g in galleries)])
    others = [g for g in galleries if g is not query]
    other_cameras = [g for g in others if g.camid != query.camid]
    return query, _pick(rng, other_cameras or others)
