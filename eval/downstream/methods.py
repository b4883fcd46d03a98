"""Re-ID fine-tuning methods by name: what model, loss and training recipe each cell builds.

A method turns an initialised backbone (random, ImageNet or the evaluated one; the runner owns
initialisation, so every method is compared on the same footing) into a Re-ID model whose
training-mode output has the `logits` the loop's accuracy reads (a `ReidOutput`; multi-branch
models a `BranchOutput`) and whose eval-mode output is the retrieval feature, and gives the loss
for it; the runner trains it with the BoT trainer's loop, sampler and schedule.
New methods are registered once in `METHODS` and named in `downstream.methods`; the runner
never changes::

    METHODS.add("mgn", ReidMethod(
        description="Multiple Granularity Network",
        options_model=MgnOptions, build_model=build_mgn, build_loss=build_mgn_loss,
        adjust_recipe=adjust_mgn_recipe,
    ))

Registered: `bot`, `agw`, `mgn` (`eval.downstream.mgn`), `sbs` (`eval.downstream.sbs`) and `bdb`
(`eval.downstream.bdb`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from torch import nn

from core.config import StrictModel, validate_config
from core.registry import Registry
from core.settings.reid import ReidTrainConfig
from trainers.reid.losses import BotLoss
from trainers.reid.model import ReidBaseline
from eval.downstream.agw import AgwLoss, AgwModel, AgwOptions
from eval.downstream.bdb import BdbOptions, adjust_bdb_recipe, build_bdb, build_bdb_loss
from eval.downstream.mgn import MgnOptions, adjust_mgn_recipe, build_mgn, build_mgn_loss
from eval.downstream.sbs import SbsOptions, adjust_sbs_recipe, build_sbs, build_sbs_loss


class NoOptions(StrictModel):
    """A method without options of its own."""


# (backbone, num_classes, train config, options) -> model
ModelBuilder = Callable[[nn.Module, int, ReidTrainConfig, Any], nn.Module]
# (model, num_classes, train config, options) -> loss module: (model output, labels) -> {"loss": ..., ...}
LossBuilder = Callable[[nn.Module, int, ReidTrainConfig, Any], nn.Module]
# (train config, options) -> the recipe this method trains with (optimiser, schedule, sampler P/K, ...)
RecipeAdjuster = Callable[[ReidTrainConfig, Any], ReidTrainConfig]


def _same_recipe(config: ReidTrainConfig, options: Any) -> ReidTrainConfig:
    return config


def validated_options(options_model: type[BaseModel], name: str, raw: dict[str, Any] | None) -> BaseModel:
    """The options of the method registered as `name`, validated from `downstream.method_options.<name>`
    (`raw`; None: the defaults). Supervised and unsupervised methods share the one options section."""
    return validate_config(options_model, raw or {}, f"downstream.method_options.{name}")


@dataclass(frozen=True)
class ReidMethod:
    """A fine-tuning method, registered in `METHODS` under its name. `build_model` receives the
    backbone already initialised (and with BoT's last stride applied when `train.last_stride` is 1)."""

    description: str
    build_model: ModelBuilder
    build_loss: LossBuilder
    options_model: type[BaseModel] = NoOptions
    adjust_recipe: RecipeAdjuster = field(default=_same_recipe)

    def options(self, name: str, raw: dict[str, Any] | None) -> BaseModel:
        """Validated options of this method, registered as `name`, from `downstream.method_options.<name>`."""
        return validated_options(self.options_model, name, raw)


METHODS: Registry[ReidMethod] = Registry("downstream method", "downstream.methods")


def _build_bot(backbone: nn.Module, num_classes: int, config: ReidTrainConfig, options: Any) -> nn.Module:
    return ReidBaseline(backbone, num_classes)


def _build_bot_loss(model: nn.Module, num_classes: int, config: ReidTrainConfig, options: Any) -> nn.Module:
    return BotLoss(config.label_smoothing, config.triplet_margin)


def _build_agw(backbone: nn.Module, num_classes: int, config: ReidTrainConfig, options: AgwOptions) -> nn.Module:
    return AgwModel(backbone, num_classes, options)


def _build_agw_loss(model: nn.Module, num_classes: int, config: ReidTrainConfig, options: AgwOptions) -> nn.Module:
    return AgwLoss(num_classes, model.feature_dim, config.label_smoothing, options)


METHODS.add("bot", ReidMethod(
    description="Bag of Tricks (Luo et al. 2019): GAP, BNNeck, label-smoothed CE + batch-hard triplet",
    build_model=_build_bot,
    build_loss=_build_bot_loss,
))
METHODS.add("agw", ReidMethod(
    description="AGW (Ye et al. 2021): non-local blocks, GeM pooling, weighted regularised triplet + centre loss",
    build_model=_build_agw,
    build_loss=_build_agw_loss,
    options_model=AgwOptions,
))
METHODS.add("mgn", ReidMethod(
    description="MGN (Wang et al. 2018): a global and two part branches (2 and 3 stripes), max pooling, "
    "256-d reductions, softmax on every feature + triplet on the whole-map ones",
    build_model=build_mgn,
    build_loss=build_mgn_loss,
    options_model=MgnOptions,
    adjust_recipe=adjust_mgn_recipe,
))
METHODS.add("sbs", ReidMethod(
    description="fast-reid's stronger baseline: non-local blocks, GeM, BNNeck, CircleSoftmax + soft-margin "
    "triplet; cosine schedule, backbone freeze, AutoAugment",
    build_model=build_sbs,
    build_loss=build_sbs_loss,
    options_model=SbsOptions,
    adjust_recipe=adjust_sbs_recipe,
))
METHODS.add("bdb", ReidMethod(
    description="Batch DropBlock Network (Dai et al. 2019): a global branch and a feature-dropping branch "
    "whose block is dropped batch-wide, softmax + triplet on each",
    build_model=build_bdb,
    build_loss=build_bdb_loss,
    options_model=BdbOptions,
    adjust_recipe=adjust_bdb_recipe,
))
