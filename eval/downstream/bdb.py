"""BDB (Dai et al., "Batch DropBlock Network for Person Re-identification and Beyond", ICCV 2019):
a global branch and a feature-dropping branch on a ResNet with last stride 1.

Global branch: average pooling, reduction to 512-d (linear, BN, ReLU), classifier. Feature-dropping
branch: one extra ResNet bottleneck block on the backbone's map, Batch DropBlock (in training, one
random rectangle, `drop_height_ratio` of the height by `drop_width_ratio` of the width, zeroed in
every map of the batch, so the branch learns from what the rest of the body shows), max pooling,
reduction to 1024-d, classifier. Each branch has a label-smoothed softmax and a batch-hard
triplet loss on its reduced feature, all summed; the retrieval feature is both reduced features
concatenated (1536-d). As the authors' code (daizuozhuo/batch-dropblock-network): soft-margin
triplet, label smoothing 0.1; Adam with warm-up and step decay is the BoT recipe's kind, so the
config's schedule stays.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.models.resnet import Bottleneck
from torch import nn

from core.config import StrictModel
from core.settings.reid import ReidTrainConfig
from eval.downstream.branches import BranchLoss, BranchOutput


class BdbOptions(StrictModel):
    """`method_options.bdb` of the downstream config."""

    global_dim: int = Field(512, ge=1, description="the global branch's reduced feature")
    drop_dim: int = Field(1024, ge=1, description="the feature-dropping branch's reduced feature")
    drop_height_ratio: float = Field(0.3, gt=0, le=1, description="dropped block height / map height (paper: 0.3)")
    drop_width_ratio: float = Field(1.0, gt=0, le=1, description="dropped block width / map width (paper: 1.0)")


class BatchDropBlock(nn.Module):
    """In training, zeroes one random block of `round(height_ratio * H)` x `round(width_ratio * W)`
    (at least 1 x 1) at the same place in every map of the batch; the identity in eval mode. The
    position is drawn from torch's generator, so it follows the run's seed."""

    def __init__(self, height_ratio: float, width_ratio: float) -> None:
        super().__init__()
        if not (0 < height_ratio <= 1 and 0 < width_ratio <= 1):
            raise ValueError(f"drop ratios must be in (0, 1], got {height_ratio} and {width_ratio}")
        self.height_ratio, self.width_ratio = height_ratio, width_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        height, width = x.shape[-2:]
        block_h = max(1, round(self.height_ratio * height))
        block_w = max(1, round(self.width_ratio * width))
        top = int(torch.randint(height - block_h + 1, ()))
        left = int(torch.randint(width - block_w + 1, ()))
        keep = x.new_ones(height, width)
        keep[top:top + block_h, left:left + block_w] = 0
        return x * keep


def _reduction(in_features: int, out_features: int) -> nn.Sequential:
    """Linear + BN + ReLU with the authors' initialisation (Kaiming, BN weight ~ N(1, 0.02))."""
    block = nn.Sequential(nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features), nn.ReLU())
    nn.init.kaiming_normal_(block[0].weight, mode="fan_out")
    nn.init.zeros_(block[0].bias)
    nn.init.normal_(block[1].weight, 1.0, 0.02)
    nn.init.zeros_(block[1].bias)
    return block


def _classifier(in_features: int, num_classes: int) -> nn.Linear:
    """Starts near zero as BoT's (N(0, 0.001)): the authors' Kaiming fan-out init scales with
    1 / sqrt(num_classes), std 0.7 for the 4 identities of a small few-shot subset, whose huge
    first logits a label-smoothed CE then pays for long after."""
    classifier = nn.Linear(in_features, num_classes)
    nn.init.normal_(classifier.weight, std=0.001)
    nn.init.zeros_(classifier.bias)
    return classifier


class BdbModel(nn.Module):
    """BDB on any CNN backbone whose width is a multiple of 4 (the extra bottleneck block keeps
    it: `planes = width / 4`, expansion 4). Training output: a `BranchOutput` (global branch
    first); eval output: the (N, global_dim + drop_dim) concatenated reduced features."""

    def __init__(self, backbone: nn.Module, num_classes: int, options: BdbOptions) -> None:
        super().__init__()
        width = int(backbone.num_features)
        if width % 4:
            raise ValueError(f"BDB's bottleneck block needs a backbone width divisible by 4, got {width}")
        self.backbone = backbone
        self.global_reduction = _reduction(width, options.global_dim)
        self.global_classifier = _classifier(options.global_dim, num_classes)
        self.drop_block = Bottleneck(width, width // 4)
        self.batch_drop = BatchDropBlock(options.drop_height_ratio, options.drop_width_ratio)
        self.drop_reduction = _reduction(width, options.drop_dim)
        self.drop_classifier = _classifier(options.drop_dim, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.global_reduction[1].num_features + self.drop_reduction[1].num_features

    def forward(self, images: torch.Tensor) -> BranchOutput | torch.Tensor:
        feature_map = self.backbone(images)
        if feature_map.ndim != 4:
            raise ValueError(f"backbone returned shape {tuple(feature_map.shape)}; BDB needs an (N, C, H, W) map")
        global_feature = self.global_reduction(feature_map.mean(dim=(2, 3)))
        dropped = self.batch_drop(self.drop_block(feature_map))
        drop_feature = self.drop_reduction(F.adaptive_max_pool2d(dropped, 1).flatten(1))
        if not self.training:
            return torch.cat([global_feature, drop_feature], dim=1)
        logits = (self.global_classifier(global_feature), self.drop_classifier(drop_feature))
        return BranchOutput(logits=logits[0], features=global_feature, id_logits=logits,
                            triplet_features=(global_feature, drop_feature))


def build_bdb(backbone: nn.Module, num_classes: int, config: ReidTrainConfig, options: BdbOptions) -> nn.Module:
    return BdbModel(backbone, num_classes, options)


def build_bdb_loss(model: nn.Module, num_classes: int, config: ReidTrainConfig, options: BdbOptions) -> nn.Module:
    """Both branches' CE and triplet losses, summed as the authors do."""
    return BranchLoss(config.label_smoothing, config.triplet_margin)


def adjust_bdb_recipe(config: ReidTrainConfig, options: BdbOptions) -> ReidTrainConfig:
    """Last stride 1, the authors' soft-margin triplet loss and label smoothing 0.1; the rest is
    the config's."""
    return config.updated(last_stride=1, triplet_margin=None, label_smoothing=0.1)
