"""AGW (Ye et al., "Deep Learning for Person Re-identification: A Survey and Outlook", 2021):
the BoT model with non-local attention blocks in the backbone, generalised-mean (GeM) pooling,
and the weighted regularised triplet loss (plus BoT's centre loss, as the authors' AGW config).

Follows the authors' code (mangye16/ReID-Survey): the non-local block is the dot-product form,
`y = (theta(x)^T phi(x) / N) g(x)`, `z = BN(W y) + x` with the BN zero-initialised so a new block
starts as the identity and a pre-trained backbone's features are untouched at step 0; blocks go
after the last 2 blocks of ResNet-50's `layer2` and the last 3 of `layer3`. (timm's
`NonLocalAttn` is the embedded-Gaussian/softmax variant, hence this small module.) The
authors' block has one inner channel (`reduc_ratio // reduc_ratio`, a typo of theirs); here
`reduction` sets `in_channels // reduction`, 2 by default, as the code intended.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from core.config import StrictModel
from trainers.reid.model import ReidBaseline, ReidOutput


class AgwOptions(StrictModel):
    """`method_options.agw` of the downstream config."""

    non_local: dict[str, int] = Field(
        default_factory=lambda: {"layer2": 2, "layer3": 3},
        description="backbone stage -> number of its last blocks followed by a non-local block "
        "(AGW on ResNet-50: layer2 2, layer3 3)",
    )
    non_local_reduction: int = Field(2, ge=1, description="inner channels = stage channels // this")
    gem_p: float = Field(3.0, ge=1.0, description="initial GeM exponent (learned)")
    center_loss_weight: float = Field(5e-4, ge=0, description="0 disables the centre loss")
    center_alpha: float = Field(0.5, gt=0, le=1, description="centre update rate (Wen et al.)")


class GeneralizedMeanPooling(nn.Module):
    """GeM: `(mean_{h,w} clamp(x, eps)^p)^(1/p)` per channel, `p` learned; p=1 is average
    pooling, p -> inf max pooling. Returns (N, C)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learn_p: bool = True) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM needs p > 0, got {p}")
        self.p = nn.Parameter(torch.tensor([float(p)]), requires_grad=learn_p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"GeM expects (N, C, H, W), got {tuple(x.shape)}")
        pooled = F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1)
        return pooled.pow(1.0 / self.p).flatten(1)


class NonLocalBlock(nn.Module):
    """Dot-product non-local block (Wang et al. 2018) as AGW uses it; shape-preserving."""

    def __init__(self, channels: int, reduction: int = 2) -> None:
        super().__init__()
        self.inner = inner = max(1, channels // reduction)
        self.theta = nn.Conv2d(channels, inner, kernel_size=1)
        self.phi = nn.Conv2d(channels, inner, kernel_size=1)
        self.g = nn.Conv2d(channels, inner, kernel_size=1)
        self.out = nn.Sequential(nn.Conv2d(inner, channels, kernel_size=1), nn.BatchNorm2d(channels))
        nn.init.zeros_(self.out[1].weight)  # starts as the identity: z = x
        nn.init.zeros_(self.out[1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        theta = self.theta(x).flatten(2).transpose(1, 2)  # (N, HW, C')
        phi = self.phi(x).flatten(2)  # (N, C', HW)
        g = self.g(x).flatten(2).transpose(1, 2)  # (N, HW, C')
        affinity = torch.bmm(theta, phi) / (h * w)  # AGW normalises by the number of positions
        y = torch.bmm(affinity, g).transpose(1, 2).reshape(n, self.inner, h, w)
        return self.out(y) + x


def _stage_channels(backbone: nn.Module, stage_name: str) -> int:
    for info in getattr(backbone, "feature_info", []):
        if info["module"] == stage_name:
            return int(info["num_chs"])
    raise ValueError(f"backbone {type(backbone).__name__} has no stage {stage_name!r} in its feature_info")


def insert_non_local_blocks(backbone: nn.Module, blocks_per_stage: dict[str, int], reduction: int = 2) -> nn.Module:
    """In place: after each of the last `n` blocks of stage `name` (a sequence of blocks, as
    timm's ResNet `layer1..layer4`), a `NonLocalBlock`. Call after the weights are loaded: block
    `i` of a stage becomes `Sequential(block, non_local)`, which renames its parameters."""
    for stage_name, count in blocks_per_stage.items():
        if count == 0:
            continue
        try:
            stage = backbone.get_submodule(stage_name)
        except AttributeError:
            raise ValueError(f"non_local: the backbone has no stage {stage_name!r}") from None
        if not isinstance(stage, nn.Sequential):
            raise ValueError(f"non_local: stage {stage_name!r} is not a sequence of blocks")
        if not 0 <= count <= len(stage):
            raise ValueError(
                f"non_local: {stage_name} has {len(stage)} blocks, cannot follow {count} of them "
                "with non-local blocks"
            )
        channels = _stage_channels(backbone, stage_name)
        for index in range(len(stage) - count, len(stage)):
            stage[index] = nn.Sequential(stage[index], NonLocalBlock(channels, reduction))
    return backbone


class AgwModel(ReidBaseline):
    """BoT's head (BNNeck, bias-free classifier) on GeM-pooled features of a backbone with
    non-local blocks."""

    def __init__(self, backbone: nn.Module, num_classes: int, options: AgwOptions) -> None:
        insert_non_local_blocks(backbone, options.non_local, options.non_local_reduction)
        super().__init__(backbone, num_classes)
        self.pool = GeneralizedMeanPooling(options.gem_p)


def _softmax_weights(distances: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise softmax of `distances` over the entries where `mask` is 1 (0 elsewhere)."""
    shifted = distances - (distances * mask).max(dim=1, keepdim=True).values
    exp = torch.exp(shifted) * mask
    return exp / (exp.sum(dim=1, keepdim=True) + 1e-6)


def weighted_regularized_triplet_loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AGW's WRT loss: soft-margin `log(1 + exp(d_p - d_n))` per anchor, where `d_p` is the
    softmax(distance)-weighted mean distance to its positives (the anchor itself included, as in
    the authors' code) and `d_n` the softmax(-distance)-weighted mean distance to its negatives.
    No margin to tune; every positive and negative contributes, hard ones most."""
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"expected (N, D) features and (N,) labels, got {tuple(features.shape)} "
                         f"and {tuple(labels.shape)}")
    same = (labels[:, None] == labels[None, :]).to(features.dtype)
    if bool(same.all()):
        raise ValueError("the weighted regularised triplet loss needs at least two identities in the batch")
    squared = (features.pow(2).sum(1, keepdim=True) + features.pow(2).sum(1)[None, :]
               - 2 * features @ features.T)
    distances = squared.clamp(min=1e-12).sqrt()  # as the authors' euclidean_dist: finite gradient at 0
    different = 1.0 - same
    positive = distances * same
    negative = distances * different
    furthest_positive = (positive * _softmax_weights(positive, same)).sum(dim=1)
    closest_negative = (negative * _softmax_weights(-negative, different)).sum(dim=1)
    return F.soft_margin_loss(closest_negative - furthest_positive, torch.ones_like(furthest_positive))


class CenterLoss(nn.Module):
    """Centre loss (Wen et al. 2016): mean squared distance of each feature to its class centre.

    The centres are buffers moved towards their classes' batch means by the paper's update rule
    (`c_j -= alpha * sum_i (c_j - x_i) / (1 + n_j)`, in training mode), not by the model's
    optimiser: BoT/AGW give them a separate SGD for the same reason, so weight decay and Adam's
    scaling never touch them. Gradients flow to the features only.
    """

    def __init__(self, num_classes: int, dim: int, alpha: float = 0.5) -> None:
        super().__init__()
        self.alpha = alpha
        self.register_buffer("centers", torch.randn(num_classes, dim))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        centers = self.centers[labels]
        loss = (features - centers).pow(2).sum(dim=1).mean()
        if self.training:
            with torch.no_grad():
                diff = centers - features.detach()
                update = torch.zeros_like(self.centers).index_add_(0, labels, diff)
                counts = torch.bincount(labels, minlength=self.centers.shape[0]).to(features.dtype)
                self.centers -= self.alpha * update / (1.0 + counts)[:, None]
        return loss


class AgwLoss(nn.Module):
    """Label-smoothed CE on the logits + WRT on the pooled features (+ weighted centre loss)."""

    def __init__(self, num_classes: int, feature_dim: int, label_smoothing: float, options: AgwOptions) -> None:
        super().__init__()
        self.cross_entropy = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.center_weight = options.center_loss_weight
        self.center = CenterLoss(num_classes, feature_dim, options.center_alpha) if self.center_weight > 0 else None

    def forward(self, output: ReidOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        losses = {"id_loss": self.cross_entropy(output.logits, labels),
                  "triplet_loss": weighted_regularized_triplet_loss(output.features, labels)}
        total = losses["id_loss"] + losses["triplet_loss"]
        if self.center is not None:
            losses["center_loss"] = self.center(output.features, labels)
            total = total + self.center_weight * losses["center_loss"]
        return {"loss": total, **losses}
