"""MGN (Wang et al., "Learning Discriminative Features with Multiple Granularities for Person
Re-Identification", ACM MM 2018): one global and two part branches on a shared ResNet trunk.

The trunk is the ResNet up to the first block of `layer3`; each branch owns a copy of the rest of
`layer3` and of `layer4` (all copies start from the same pre-trained weights and then train
apart). The global branch keeps `layer4`'s downsampling; the part branches run it with stride 1
(the map stays twice as tall for its stripes). Every branch max-pools its whole map, and a part
branch with `n` stripes max-pools each of `n` horizontal stripes too: 8 features for MGN's 1 +
2 + 3. Each is reduced to 256-d (1x1 conv = linear on a pooled vector, BN, ReLU) and has its own
classifier; the triplet loss sees the 3 reduced whole-map features. The retrieval feature is the
8 reduced features concatenated (2048-d).

As the paper's Sec. 3.3 has it (and unlike the common re-implementations, fast-reid's MGN and
MGN-pytorch, which classify the reduced ones, `global_softmax_on: reduced`), the 3 whole-map
classifiers see the pooled 2048-d features before reduction. The paper's recipe (`recipe: paper`):
momentum SGD, lr 0.01, weight decay 5e-4, lr x0.1 at 1/2 and 3/4 of the run (epochs 40 and 60 of
80), no warm-up, plain softmax (no label smoothing), triplet margin 1.2; both loss kinds averaged
over their features and summed.
"""

from __future__ import annotations

import copy
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.models.resnet import ResNet
from torch import nn

from core.config import StrictModel
from core.settings.reid import ReidTrainConfig
from eval.downstream.branches import BranchLoss, BranchOutput
from trainers.weights import set_last_stride_one

# Where the paper's lr steps fall, as fractions of the run (epochs 40 and 60 of 80).
PAPER_MILESTONES = (0.5, 0.75)


class MgnOptions(StrictModel):
    """`method_options.mgn` of the downstream config."""

    parts: tuple[Annotated[int, Field(ge=2)], ...] = Field(
        (2, 3), min_length=1, description="horizontal stripes of each part branch (MGN: 2 and 3)"
    )
    reduction_dim: int = Field(256, ge=1, description="size of each reduced feature")
    global_softmax_on: Literal["pooled", "reduced"] = Field(
        "pooled", description="what the whole-map classifiers see: the pooled feature (the paper) or "
        "its reduction (fast-reid, MGN-pytorch)"
    )
    recipe: Literal["paper", "bot"] = Field("paper", description="paper: the MGN recipe; bot: the config's")
    sgd_lr: float = Field(0.01, gt=0, description="recipe paper: SGD's base lr")
    triplet_margin: float = Field(1.2, gt=0, description="recipe paper: the triplet loss's margin")


def _stage_downsamples(stage: nn.Module, in_channels: int) -> bool:
    """Whether `stage` halves an (in_channels, 8, 8) map; probed in eval mode, so no BN
    statistics move."""
    was_training = stage.training
    stage.eval()
    try:
        with torch.no_grad():
            probe = torch.zeros(1, in_channels, 8, 8, device=next(stage.parameters()).device)
            return stage(probe).shape[-1] == 4
    finally:
        stage.train(was_training)


class MgnModel(nn.Module):
    """MGN on a timm ResNet-family backbone (any depth: channels come from `feature_info`).

    Everything initialised from the backbone (trunk and branches) lives under `backbone`, which is
    what a backbone freeze holds still. Training output: a `BranchOutput` (the global branch's
    logits first); eval output: the (N, feature_dim) concatenated reduced features."""

    def __init__(self, backbone: nn.Module, num_classes: int, options: MgnOptions) -> None:
        super().__init__()
        if not isinstance(backbone, ResNet):
            raise ValueError(f"MGN splits a timm ResNet-family backbone at layer3[1]; got {type(backbone).__name__}")
        if len(backbone.layer3) < 2:
            raise ValueError("MGN needs at least 2 blocks in layer3 (the trunk ends after the first)")
        channels = {info["module"]: int(info["num_chs"]) for info in backbone.feature_info}
        if not _stage_downsamples(backbone.layer4, channels["layer3"]):
            raise ValueError("MGN's global branch downsamples in layer4: build the backbone with last_stride 2")
        # The part branches' layer4, stride 1 by BoT's checked last-stride trick on a copy.
        part_layer4 = set_last_stride_one(copy.deepcopy(backbone)).layer4
        trunk = nn.Sequential(backbone.conv1, backbone.bn1, backbone.act1, backbone.maxpool,
                              backbone.layer1, backbone.layer2, backbone.layer3[0])
        rest_of_layer3 = backbone.layer3[1:]

        def branch(layer4: nn.Module) -> nn.Sequential:
            return nn.Sequential(copy.deepcopy(rest_of_layer3), copy.deepcopy(layer4))

        self.backbone = nn.ModuleDict({
            "trunk": trunk,
            "branches": nn.ModuleList([branch(backbone.layer4), *(branch(part_layer4) for _ in options.parts)]),
        })
        self.stripes = (1, *options.parts)  # per branch; 1 = the global branch, whole map only
        width, dim = channels["layer4"], options.reduction_dim
        num_features = len(self.stripes) + sum(options.parts)
        self.reductions = nn.ModuleList(
            nn.Sequential(nn.Linear(width, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU())
            for _ in range(num_features)
        )
        whole_map_inputs = width if options.global_softmax_on == "pooled" else dim
        self.classifiers = nn.ModuleList(
            nn.Linear(whole_map_inputs if index < len(self.stripes) else dim, num_classes)
            for index in range(num_features)
        )
        self.global_softmax_on = options.global_softmax_on
        for reduction in self.reductions:
            nn.init.kaiming_normal_(reduction[0].weight, mode="fan_in")
        for classifier in self.classifiers:  # near zero, as BoT's: see `eval.downstream.bdb._classifier`
            nn.init.normal_(classifier.weight, std=0.001)
            nn.init.zeros_(classifier.bias)

    @property
    def feature_dim(self) -> int:
        return sum(reduction[1].num_features for reduction in self.reductions)

    def forward(self, images: torch.Tensor) -> BranchOutput | torch.Tensor:
        shared = self.backbone["trunk"](images)
        whole_maps, stripes = [], []
        for branch, count in zip(self.backbone["branches"], self.stripes):
            feature_map = branch(shared)
            whole_maps.append(F.adaptive_max_pool2d(feature_map, 1).flatten(1))
            if count > 1:  # adaptive bins: equal stripes when the height divides, overlapping ones otherwise
                stripes.extend(F.adaptive_max_pool2d(feature_map, (count, 1)).flatten(2).unbind(2))
        pooled = whole_maps + stripes  # [3 whole-map features, then 2 + 3 stripes], fast-reid's order
        reduced = [reduction(feature) for reduction, feature in zip(self.reductions, pooled)]
        if not self.training:
            return torch.cat(reduced, dim=1)
        inputs = [p if self.global_softmax_on == "pooled" and i < len(whole_maps) else r
                  for i, (p, r) in enumerate(zip(pooled, reduced))]
        logits = tuple(classifier(x) for classifier, x in zip(self.classifiers, inputs))
        return BranchOutput(logits=logits[0], features=reduced[0], id_logits=logits,
                            triplet_features=tuple(reduced[:len(whole_maps)]))


def paper_milestones(epochs: int) -> tuple[int, ...]:
    """The paper's lr steps (1/2 and 3/4 of the run) for a run of `epochs`."""
    return tuple(sorted({max(1, round(epochs * fraction)) for fraction in PAPER_MILESTONES}))


def build_mgn(backbone: nn.Module, num_classes: int, config: ReidTrainConfig, options: MgnOptions) -> nn.Module:
    return MgnModel(backbone, num_classes, options)


def build_mgn_loss(model: nn.Module, num_classes: int, config: ReidTrainConfig, options: MgnOptions) -> nn.Module:
    """Mean CE over the classifiers + mean triplet over the whole-map features."""
    return BranchLoss(config.label_smoothing, config.triplet_margin,
                      id_weight=1.0 / len(model.classifiers), triplet_weight=1.0 / len(model.stripes))


def adjust_mgn_recipe(config: ReidTrainConfig, options: MgnOptions) -> ReidTrainConfig:
    """Last stride 2 always (the global branch downsamples; the part branches set their own
    stride); with `recipe: paper` the paper's optimiser, schedule and losses, at the config's
    epochs, image size and batch."""
    if options.recipe == "bot":
        return config.updated(last_stride=2)
    return config.updated(
        last_stride=2, optimizer="sgd", momentum=0.9, base_lr=options.sgd_lr, weight_decay=5e-4,
        lr_schedule="step", warmup_epochs=0, milestones=paper_milestones(config.epochs), gamma=0.1,
        label_smoothing=0.0, triplet_margin=options.triplet_margin, freeze_backbone_epochs=0,
    )
