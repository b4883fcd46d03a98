"""The paper's fine-tuning data regimes (Sec. 4.2, after LUPerson): supervised, few-shot image
(Fs) and small-scale identity (Ss).

- `supervised`: the whole training split.
- `fsP`: every identity keeps P % of its training images (rounded half up), at least
  `min_images_per_id` of them (default 2; an identity that has fewer keeps all it has). Two,
  not one: the triplet losses of BoT and AGW need a positive for each anchor, and the PK sampler
  would otherwise fill an identity's K slots with copies of one image, whose only positive is
  an augmented copy of itself. The fraction actually kept is recorded with every result.
- `ssP`: P % of the identities (rounded half up, at least `min_identities`, default 2) keep all
  their images; the others are dropped.

Subsets are deterministic per seed and nested: for one seed, the images of `fs10` are among those
of `fs30`, and the identities of `ss10` among those of `ss30`, so a curve over fractions
(the paper's Fig. 7) adds data instead of drawing a new sample at each point. They depend on the
records' content (source, pid, path), not on their order.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from core.datasets.base import ImageRecord
from core.settings.downstream import Setting

# Independent random streams for the two subset kinds, so fs and ss of one seed do not share draws.
_FS_STREAM, _SS_STREAM = 1, 2


def kept_count(total: int, percent: float, minimum: int) -> int:
    """`percent` % of `total` rounded half up, at least `minimum`, at most `total`."""
    return min(total, max(minimum, int(np.floor(percent / 100 * total + 0.5))))


def _by_identity(records: Sequence[ImageRecord]) -> dict[tuple[str, int], list[ImageRecord]]:
    groups: dict[tuple[str, int], list[ImageRecord]] = defaultdict(list)
    for record in records:
        if not record.distractor:  # distractors are never training identities
            groups[(record.source, record.pid)].append(record)
    for images in groups.values():
        images.sort(key=lambda r: r.path)
    return groups


def few_shot_images(
    records: Sequence[ImageRecord], percent: int, seed: int, min_images_per_id: int = 2
) -> list[ImageRecord]:
    """Fs: each identity keeps `percent` % of its images (half up), at least `min_images_per_id`
    (or all it has, if fewer). Order of the result: by identity, then the seed's permutation."""
    if not 1 <= percent <= 100:
        raise ValueError(f"percent must be in 1..100, got {percent}")
    if min_images_per_id < 1:
        raise ValueError(f"min_images_per_id must be >= 1, got {min_images_per_id}")
    kept: list[ImageRecord] = []
    for (source, pid), images in sorted(_by_identity(records).items()):
        count = kept_count(len(images), percent, min_images_per_id)
        # crc32, not `hash`: Python salts the hash of a str per process.
        rng = np.random.default_rng([seed % 2**32, _FS_STREAM, zlib.crc32(f"{source}\0{pid}".encode("utf-8"))])
        kept.extend(images[i] for i in rng.permutation(len(images))[:count])
    return kept


def small_scale_identities(
    records: Sequence[ImageRecord], percent: int, seed: int, min_identities: int = 2
) -> list[ImageRecord]:
    """Ss: `percent` % of the identities (half up, at least `min_identities`) keep all their
    images. Order of the result: the records' own order."""
    if not 1 <= percent <= 100:
        raise ValueError(f"percent must be in 1..100, got {percent}")
    identities = sorted(_by_identity(records))
    count = kept_count(len(identities), percent, min_identities)
    order = np.random.default_rng([seed % 2**32, _SS_STREAM]).permutation(len(identities))
    chosen = {identities[i] for i in order[:count]}
    return [r for r in records if not r.distractor and (r.source, r.pid) in chosen]


def training_subset(
    records: Sequence[ImageRecord],
    setting: Setting,
    seed: int,
    min_images_per_id: int = 2,
    min_identities: int = 2,
) -> list[ImageRecord]:
    """The training records a cell fine-tunes on (distractors always dropped)."""
    if setting.kind == "fs":
        return few_shot_images(records, setting.percent, seed, min_images_per_id)
    if setting.kind == "ss":
        return small_scale_identities(records, setting.percent, seed, min_identities)
    return [r for r in records if not r.distractor]
