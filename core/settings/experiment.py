"""The `experiment:` section of a run preset: which arms, which seeds, which factory ablations.

An arm is an initialisation of the downstream backbone:
- `random`: timm's initialisation (no pre-training);
- `source`: pre-trained on the real training images of the identities the factory was given;
- `generated`: pre-trained on the build's kept images only;
- `source+generated`: both, one label per identity;
- `imagenet`: no pre-training, fine-tuned from the downstream `imagenet` init (timm's ImageNet
  weights, or the `downstream.imagenet_standin` backbone file where those cannot be had): the
  paper's reference initialisation. Not among the default arms: a config opts in.
An ablation is a build with `--set` style overrides (e.g. `generation.prior_loss_weight=0`),
pre-trained on its generated images only. Every build, data set and pre-training run is made
once and shared by every arm that uses it.
The data-scale study (`data_scale`, the paper's Table 8) pre-trains on shares of the main build's
generated images: fewer images per identity (`images`), or fewer identities (`identities`).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from core.config import StrictModel, UriStr, require_unique

ARM_RANDOM, ARM_SOURCE, ARM_GENERATED, ARM_BOTH = "random", "source", "generated", "source+generated"
ARM_IMAGENET = "imagenet"
MAIN_ARMS = (ARM_RANDOM, ARM_SOURCE, ARM_GENERATED, ARM_BOTH)  # the default arms
ARM_NAMES = (*MAIN_ARMS, ARM_IMAGENET)  # every arm a config may name
ArmName = Literal["random", "source", "generated", "source+generated", "imagenet"]
# The build sections an ablation may change; the recipe downstream of the build stays the arms'.
ABLATION_SECTIONS = ("sequences", "caption", "generation", "filter")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class DataScaleConfig(StrictModel):
    """The paper's Table 8: pre-training on P % of the main build's generated data, two ways.

    - `images`: every identity keeps P % of its generated images (rounded half up, at least one),
      so the identities stay and the images per identity shrink;
    - `identities`: P % of the identities (rounded half up, at least one) keep all their images.
    For one seed the subsets are nested (the 12.5 % set lies within the 25 % one) and depend on
    the rows' content (identity, sample index), not their order. 100 % is the main build itself:
    its own shards and, where the `generated` arm runs that seed, that arm's very chain.
    """

    images: list[float] = Field(
        default_factory=lambda: [12.5, 25.0, 50.0, 100.0],
        description="percents (1..100) of each identity's generated images kept; [] skips this axis")
    identities: list[float] = Field(
        default_factory=lambda: [12.5, 25.0, 50.0, 100.0],
        description="percents (1..100) of the generated identities kept, each with all its images; [] skips this axis")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1,
                             description="seeds of the scale chains: each draws its own subsets, then pre-trains "
                             "and fine-tunes with that seed")

    @field_validator("images", "identities")
    @classmethod
    def _percents(cls, percents: list[float], info: ValidationInfo) -> list[float]:
        outside = [p for p in percents if not 1 <= p <= 100]
        if outside:
            raise ValueError(f"{info.field_name} {outside} outside 1..100 (percents of the main build's "
                             "generated data)")
        require_unique(percents, f"{info.field_name} percents")
        return percents

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        require_unique(seeds, "seeds")
        return seeds

    @model_validator(mode="after")
    def _some_point(self) -> DataScaleConfig:
        if not self.images and not self.identities:
            raise ValueError("both images and identities are empty: give one of them percents, or leave "
                             "data_scale out")
        return self


class ExperimentConfig(StrictModel):
    """Arms x seeds of the evidence experiment (`python -m eval.experiment`)."""

    out_dir: UriStr = Field("outputs/experiment", description="output folder or URI; --out overrides")
    arms: list[ArmName] = Field(default_factory=lambda: list(MAIN_ARMS), min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1,
                             description="seeds of the main arms (pre-training and fine-tuning)")
    ablations: dict[str, list[str]] = Field(
        default_factory=dict,
        description="name -> build overrides (KEY.PATH=VALUE under sequences/caption/generation/filter); "
        "each is a build of its own, pre-trained on its generated images only",
    )
    ablation_seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    baseline: str = Field(ARM_SOURCE, description="the arm every other arm is compared with, paired by seed")
    concurrency: int = Field(
        1, ge=1, description="arm x seed chains (pre-train, then fine-tune) running at once; on a 2-core "
        "machine 1, on a cluster as many as it has room for",
    )
    consistency_identities: int = Field(
        0, ge=0, description="> 0: per build, the Re-ID filter pass rate of fine-tuned vs base-model samples "
        "(same prompts and seeds) over its first N identities",
    )
    data_scale: DataScaleConfig | None = Field(
        None, description="the paper's Table 8: pre-training on shares of the main build's generated images "
        "and identities, fine-tuned with the same downstream grid (None: not run)",
    )

    @field_validator("arms", "seeds", "ablation_seeds")
    @classmethod
    def _unique(cls, values: list) -> list:
        require_unique(values)
        return values

    @field_validator("ablations")
    @classmethod
    def _ablations(cls, ablations: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, overrides in ablations.items():
            if not _NAME.match(name) or name in ARM_NAMES:
                raise ValueError(f"ablation name {name!r}: lowercase letters, digits, '-' and '_', not an arm's name")
            for override in overrides:
                key = override.partition("=")[0]
                if "=" not in override or key.split(".")[0] not in ABLATION_SECTIONS:
                    raise ValueError(f"ablation {name}: {override!r} must be KEY.PATH=VALUE under "
                                     f"{', '.join(ABLATION_SECTIONS)}")
        return ablations

    @model_validator(mode="after")
    def _baseline_is_an_arm(self) -> ExperimentConfig:
        if self.baseline not in (*self.arms, *self.ablations):
            raise ValueError(f"baseline {self.baseline!r} is neither an arm ({self.arms}) nor an ablation")
        return self
