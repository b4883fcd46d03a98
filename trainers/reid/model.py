"""The BoT model: timm backbone (last stride 1) -> global average pooling -> BNNeck -> classifier.

BNNeck (Luo et al., 2019, Sec. 3.6): the triplet loss is computed on the pooled feature `f_t`,
the identity loss on `f_i = BN(f_t)`; the BN bias is frozen so `f_i` stays centred, and the
classifier has no bias so its decision boundaries pass through the origin of the normalised
space, which is what makes cosine/L2-normalised retrieval on `f_i` work. At inference the model
returns `f_i`.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file
from timm.layers import SelectAdaptivePool2d
from torch import nn

from core.storage import local_file, resolve
from core.settings.reid import ReidTrainConfig
from trainers.weights import INIT_RANDOM, build_backbone, check_state_dict_matches

CLASSIFIER_WEIGHT = "classifier.weight"


class ReidOutput(NamedTuple):
    """What the model returns in training mode."""

    logits: torch.Tensor  # (N, num_classes), from the BN feature: for the identity (CE) loss
    features: torch.Tensor  # (N, dim), pooled feature before BN: for the triplet loss


class ReidBaseline(nn.Module):
    """Backbone + GAP + BNNeck + bias-free linear classifier.

    `forward` returns a `ReidOutput` in training mode and the (N, dim) post-BN feature in eval
    mode, as in BoT: one module serves training and retrieval.
    """

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        dim = int(backbone.num_features)
        self.backbone = backbone
        self.pool = SelectAdaptivePool2d(pool_type="avg", flatten=True)
        self.bottleneck = nn.BatchNorm1d(dim)
        self.bottleneck.bias.requires_grad_(False)  # BNNeck: no shift, features stay centred
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        # BoT's initialisation: unit-scale BN, near-zero classifier so early CE gradients are mild.
        nn.init.ones_(self.bottleneck.weight)
        nn.init.zeros_(self.bottleneck.bias)
        nn.init.normal_(self.classifier.weight, std=0.001)

    @property
    def feature_dim(self) -> int:
        return self.bottleneck.num_features

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def forward(self, images: torch.Tensor) -> ReidOutput | torch.Tensor:
        feature_map = self.backbone(images)
        if feature_map.ndim != 4:
            raise ValueError(
                f"backbone returned shape {tuple(feature_map.shape)}; ReidBaseline needs an "
                "(N, C, H, W) feature map (a CNN backbone)"
            )
        pooled = self.pool(feature_map)
        normalised = self.bottleneck(pooled)
        if not self.training:
            return normalised
        return ReidOutput(logits=self.classifier(normalised), features=pooled)


def build_reid_model(config: ReidTrainConfig, num_classes: int, init: str | None = None) -> ReidBaseline:
    """The BoT model for `num_classes` training identities; backbone weights from `init`
    (default `config.init`)."""
    backbone = build_backbone(config.arch, config.init if init is None else init, config.last_stride)
    return ReidBaseline(backbone, num_classes)


def load_reid_model(path: str | Path, config: ReidTrainConfig, num_classes: int | None = None) -> ReidBaseline:
    """A trained `ReidBaseline` from a whole-model `.safetensors` file (as `train_reid` writes),
    in eval mode. `num_classes` defaults to the classifier size stored in the file. `path` may be
    a URI (fetched once per machine)."""
    state = load_file(str(local_file(resolve(path))))
    if num_classes is None:
        if CLASSIFIER_WEIGHT not in state:
            raise ValueError(f"{path}: no {CLASSIFIER_WEIGHT!r}; is this a backbone-only file?")
        num_classes = int(state[CLASSIFIER_WEIGHT].shape[0])
    # Random init: every weight is overwritten next, so never fetch pretrained ones for nothing.
    model = build_reid_model(config, num_classes, init=INIT_RANDOM)
    check_state_dict_matches(model, state, what=str(path))
    model.load_state_dict(state, strict=True)
    return model.eval()
