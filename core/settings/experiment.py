"""The `experiment:` section of a run preset: which arms, which seeds, which factory ablations.

An arm is an initialisation of the downstream backbone:
- `random`: timm's initialisation (no pre-training);
- `source`: pre-trained on the real training images of the identities the factory was given;
- `generated`: pre-trained on the build's kept images only;
- `source+generated`: both, one label per identity.
An ablation is a build with `--set` style overrides (e.g. `generation.prior_loss_weight=0`),
pre-trained on its generated images only. Every build, data set and pre-training run is made
once and shared by every arm that uses it.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from core.config import StrictModel, UriStr, require_unique

ARM_RANDOM, ARM_SOURCE, ARM_GENERATED, ARM_BOTH = "random", "source", "generated", "source+generated"
MAIN_ARMS = (ARM_RANDOM, ARM_SOURCE, ARM_GENERATED, ARM_BOTH)
ArmName = Literal["random", "source", "generated", "source+generated"]
# The build sections an ablation may change; the recipe downstream of the build stays the arms'.
ABLATION_SECTIONS = ("sequences", "caption", "generation", "filter")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


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

    @field_validator("arms", "seeds", "ablation_seeds")
    @classmethod
    def _unique(cls, values: list) -> list:
        require_unique(values)
        return values

    @field_validator("ablations")
    @classmethod
    def _ablations(cls, ablations: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, overrides in ablations.items():
            if not _NAME.match(name) or name in MAIN_ARMS:
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
