"""SBS, fast-reid's "stronger baseline" (He et al., "FastReID: A Pytorch Toolbox for General
Instance Re-identification", 2020; `configs/Base-SBS.yml`): BoT with non-local blocks, GeM
pooling, a cosine classifier trained with CircleSoftmax, and its own recipe.

Model: AGW's non-local blocks (fast-reid's are the same dot-product block, after the last 2
blocks of `layer2` and the last 3 of `layer3`), learned GeM pooling, BNNeck; the classifier
compares the BN feature with its class weights by cosine, and in training CircleSoftmax
(Sun et al., "Circle Loss", 2020, class-level form) re-weights those similarities with margin
0.35 and scale 64 before a label-smoothed (0.1) cross-entropy. The triplet loss is batch-hard on
the BN feature (`NECK_FEAT: after`), with fast-reid's margin 0, i.e. the soft margin
`log(1 + exp(d_ap - d_an))`.

Recipe (`adjust_sbs_recipe`), at the config's epochs, image size, batch and base lr: Adam,
warm-up from 0.1 x the base lr, the base lr until half the run (fast-reid: DELAY_EPOCHS 30 of
60), then cosine annealing to 0.002 x the base lr (ETA_MIN_LR 7e-7 of 3.5e-4); the backbone frozen
for the first `freeze_backbone_epochs` (FREEZE_ITERS 1000 at Market-1501's ~200 iterations an
epoch: 5); AutoAugment on 10 % of the images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from core.config import StrictModel
from core.settings.reid import ReidTrainConfig
from eval.downstream.agw import GeneralizedMeanPooling, insert_non_local_blocks
from trainers.reid.losses import batch_hard_triplet_loss
from trainers.reid.model import ReidBaseline, ReidOutput

# fast-reid's SBS schedule, as fractions of the base lr and of the run.
WARMUP_FACTOR = 0.1  # SOLVER.WARMUP_FACTOR
MIN_LR_FACTOR = 0.002  # SOLVER.ETA_MIN_LR / SOLVER.BASE_LR = 7e-7 / 3.5e-4


class SbsOptions(StrictModel):
    """`method_options.sbs` of the downstream config."""

    non_local: dict[str, int] = Field(
        default_factory=lambda: {"layer2": 2, "layer3": 3},
        description="backbone stage -> number of its last blocks followed by a non-local block",
    )
    non_local_reduction: int = Field(2, ge=1, description="inner channels = stage channels // this")
    gem_p: float = Field(3.0, ge=1.0, description="initial GeM exponent (learned)")
    circle_scale: float = Field(64.0, gt=0, description="CircleSoftmax scale s")
    circle_margin: float = Field(0.35, ge=0, lt=1, description="CircleSoftmax margin m")
    freeze_backbone_epochs: int = Field(5, ge=0, description="epochs in which only the head trains")
    hold_fraction: float = Field(0.5, ge=0, lt=1, description="part of the run at the base lr before "
                                 "cosine annealing starts (fast-reid: 30 of 60 epochs)")
    autoaugment_prob: float = Field(0.1, ge=0, le=1, description="chance of AutoAugment per training image")


class SbsModel(ReidBaseline):
    """BoT's BNNeck on GeM-pooled features of a backbone with non-local blocks; the classifier's
    rows are class directions. Training output: a `ReidOutput` whose `logits` are the cosine
    similarities (N, num_classes) and whose `features` are the BN features; eval output: the BN
    feature."""

    def __init__(self, backbone: nn.Module, num_classes: int, options: SbsOptions) -> None:
        insert_non_local_blocks(backbone, options.non_local, options.non_local_reduction)
        super().__init__(backbone, num_classes)
        self.pool = GeneralizedMeanPooling(options.gem_p)
        nn.init.normal_(self.classifier.weight, std=0.01)  # fast-reid's EmbeddingHead

    def forward(self, images: torch.Tensor) -> ReidOutput | torch.Tensor:
        feature_map = self.backbone(images)
        if feature_map.ndim != 4:
            raise ValueError(f"backbone returned shape {tuple(feature_map.shape)}; SBS needs an (N, C, H, W) map")
        normalised = self.bottleneck(self.pool(feature_map))
        if not self.training:
            return normalised
        cosine = F.linear(F.normalize(normalised), F.normalize(self.classifier.weight))
        return ReidOutput(logits=cosine, features=normalised)


def circle_softmax_logits(cosine: torch.Tensor, labels: torch.Tensor, scale: float, margin: float) -> torch.Tensor:
    """CircleSoftmax: the target similarity `s_p` becomes `a_p (s_p - (1 - m))`, the others `a_n
    (s_n - m)`, with the self-paced weights `a_p = [1 + m - s_p]_+`, `a_n = [s_n + m]_+` held
    constant (detached), all times `scale`; cross-entropy on these is the class-level circle loss."""
    similarity = cosine.detach()
    positive = (1 + margin - similarity).clamp(min=0) * (cosine - (1 - margin))
    negative = (similarity + margin).clamp(min=0) * (cosine - margin)
    is_target = F.one_hot(labels, cosine.shape[1]).bool()
    return scale * torch.where(is_target, positive, negative)


class SbsLoss(nn.Module):
    """Label-smoothed CE on the CircleSoftmax logits + batch-hard triplet on the BN features."""

    def __init__(self, label_smoothing: float, triplet_margin: float | None, options: SbsOptions) -> None:
        super().__init__()
        self.cross_entropy = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.triplet_margin = triplet_margin
        self.scale, self.margin = options.circle_scale, options.circle_margin

    def forward(self, output: ReidOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        id_loss = self.cross_entropy(circle_softmax_logits(output.logits, labels, self.scale, self.margin), labels)
        triplet = batch_hard_triplet_loss(output.features, labels, self.triplet_margin)
        return {"loss": id_loss + triplet, "id_loss": id_loss, "triplet_loss": triplet}


def build_sbs(backbone: nn.Module, num_classes: int, config: ReidTrainConfig, options: SbsOptions) -> nn.Module:
    return SbsModel(backbone, num_classes, options)


def build_sbs_loss(model: nn.Module, num_classes: int, config: ReidTrainConfig, options: SbsOptions) -> nn.Module:
    return SbsLoss(config.label_smoothing, config.triplet_margin, options)


def adjust_sbs_recipe(config: ReidTrainConfig, options: SbsOptions) -> ReidTrainConfig:
    """fast-reid's SBS solver and losses at the config's epochs, image size, batch and base lr."""
    return config.updated(
        optimizer="adam", lr_schedule="cosine", warmup_factor=WARMUP_FACTOR,
        cosine_delay_epochs=round(options.hold_fraction * config.epochs), min_lr=MIN_LR_FACTOR * config.base_lr,
        freeze_backbone_epochs=options.freeze_backbone_epochs, autoaugment_prob=options.autoaugment_prob,
        label_smoothing=0.1, triplet_margin=None,
    )
