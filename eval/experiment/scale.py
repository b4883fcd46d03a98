"""The data-scale study (the paper's Table 8, `experiment.data_scale`): which chains it needs and
the pre-training subsets they read, taken from the main build's shard rows.

Two axes, as Table 8's "Image Scale" and "ID Scale":
- `images` P %: every identity keeps P % of its generated images (rounded half up, at least one:
  pre-training is identity classification, which needs no positive pair), so the number of
  identities stays and the images per identity shrink;
- `identities` P %: P % of the identities (rounded half up, at least one) keep all their images.

The draws follow `eval.downstream.settings` (Fs / Ss): a seeded permutation per identity, or of
the sorted identities, whose first N are kept. So for one seed a smaller share lies within every
larger one (a curve adds data instead of drawing anew), and the subset depends on the rows'
content (identity, sample index, file name), not their order. 100 % is the main build itself:
its own shards, no copy, and one chain per seed for both axes, the `generated` arm's where that
arm runs the seed.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.settings.experiment import ARM_GENERATED, ExperimentConfig
from eval.downstream.settings import kept_count as fraction_count

ScaleKind = Literal["images", "identities"]
IMAGES, IDENTITIES = "images", "identities"
SCALE_GROUP = "scale"
FULL_SCALE_ARM = "gen-100%"  # the 100 % point when the `generated` arm does not run that seed
_ARM_TAG = {IMAGES: "img", IDENTITIES: "ids"}
_DATA_TAG = {IMAGES: "images", IDENTITIES: "ids"}
# Separate random streams for the two axes, so the image and identity draws of one seed are unrelated.
_IMAGES_STREAM, _IDENTITIES_STREAM = 1, 2
# Part of every subset's data digest: a change of the sampling rule rewrites the sets.
SUBSET_SCHEME = "scale-subsets-v1"


@dataclass(frozen=True)
class ScaleRun:
    """One point of the study at one seed: the chain that measures it and the set it pre-trains on."""

    kind: ScaleKind
    percent: float
    seed: int
    arm: str  # the chain's arm (its rows in runs.csv / results.csv)
    data_name: str | None  # OUT/data/<data_name>; None: the main build's own shards (100 %)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.percent:g} %"


def scale_arm(kind: ScaleKind, percent: float) -> str:
    """`gen-img-25%` / `gen-ids-12.5%`: the arm name of a point below 100 %."""
    return f"gen-{_ARM_TAG[kind]}-{percent:g}%"


def scale_data_name(kind: ScaleKind, percent: float, seed: int) -> str:
    """`scale-images-25-seed-0`: the folder under OUT/data of a point's pre-training set."""
    return f"scale-{_DATA_TAG[kind]}-{percent:g}-seed-{seed}"


def plan_scale_runs(exp: ExperimentConfig) -> list[ScaleRun]:
    """Every point x seed of `exp.data_scale` (none without it), images before identities, by
    ascending percent. 100 % pre-trains on the main build: the `generated` arm's chain where that
    arm runs the seed, otherwise one `gen-100%` chain that both axes share."""
    scale = exp.data_scale
    if scale is None:
        return []
    generated_seeds = set(exp.seeds) if ARM_GENERATED in exp.arms else set()
    runs = []
    for kind, percents in ((IMAGES, scale.images), (IDENTITIES, scale.identities)):
        for percent in sorted(percents):
            for seed in scale.seeds:
                if percent == 100:
                    arm = ARM_GENERATED if seed in generated_seeds else FULL_SCALE_ARM
                    runs.append(ScaleRun(kind, percent, seed, arm, None))
                else:
                    runs.append(ScaleRun(kind, percent, seed, scale_arm(kind, percent),
                                         scale_data_name(kind, percent, seed)))
    return runs


def kept_count(total: int, percent: float) -> int:
    """`percent` % of `total`, rounded half up, at least 1, at most `total` (the Fs/Ss rule)."""
    return fraction_count(total, percent, minimum=1)


def image_subset(table: pa.Table, percent: float, seed: int) -> pa.Table:
    """Rows of `table` (`SHARD_SCHEMA`) where every identity keeps `percent` % of its rows (half
    up, at least one): a seeded permutation of its rows in content order (sample index, then file
    name), first N kept. Result ordered by identity, then content."""
    paths = pc.struct_field(table.column("image"), "path").to_pylist()
    rows_of: dict[str, list[tuple[int, str, int]]] = defaultdict(list)
    for row, (identity, index, path) in enumerate(zip(table.column("identity").to_pylist(),
                                                      table.column("index").to_pylist(), paths)):
        rows_of[identity].append((index, path or "", row))
    kept: list[int] = []
    for identity in sorted(rows_of):
        rows = sorted(rows_of[identity])
        # crc32, not `hash`: Python salts the hash of a str per process.
        rng = np.random.default_rng([seed % 2**32, _IMAGES_STREAM, zlib.crc32(identity.encode("utf-8"))])
        chosen = sorted(rng.permutation(len(rows))[:kept_count(len(rows), percent)])
        kept += [rows[i][2] for i in chosen]
    return table.take(pa.array(kept, pa.int64()))


def identity_subset(table: pa.Table, percent: float, seed: int) -> pa.Table:
    """Rows of `table` (`SHARD_SCHEMA`) of `percent` % of its identities (half up, at least one):
    a seeded permutation of the sorted identities, first N kept with all their rows. Result
    ordered by identity, then sample index."""
    identities = sorted(set(table.column("identity").to_pylist()))
    order = np.random.default_rng([seed % 2**32, _IDENTITIES_STREAM]).permutation(len(identities))
    chosen = pa.array(sorted(identities[i] for i in order[:kept_count(len(identities), percent)]), pa.string())
    kept = table.filter(pc.is_in(table.column("identity"), value_set=chosen))
    return kept.sort_by([("identity", "ascending"), ("index", "ascending")])


def scale_subset(table: pa.Table, kind: ScaleKind, percent: float, seed: int) -> pa.Table:
    """The pre-training rows of one scale point, drawn from the main build's rows `table`."""
    if not 1 <= percent <= 100:
        raise ValueError(f"percent must be in 1..100, got {percent}")
    draw = {IMAGES: image_subset, IDENTITIES: identity_subset}[kind]
    return draw(table, percent, seed)
