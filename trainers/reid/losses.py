"""BoT's losses: label-smoothed cross-entropy on the BN feature + batch-hard triplet on the
pooled feature."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainers.reid.model import ReidOutput


def batch_hard_triplet_loss(
    features: torch.Tensor, labels: torch.Tensor, margin: float | None = 0.3
) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al., 2017) with Euclidean distances.

    For each anchor: its farthest same-label sample and its nearest other-label sample.
    `margin` gives the hinge `relu(d_ap - d_an + margin)`; `None` the soft margin
    `log(1 + exp(d_ap - d_an))`. Needs at least two labels in the batch (a PK batch has P >= 2).
    """
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"expected (N, D) features and (N,) labels, got {tuple(features.shape)} "
                         f"and {tuple(labels.shape)}")
    distances = torch.cdist(features, features)
    same = labels[:, None] == labels[None, :]
    # Checked on a CPU only: on a GPU the test would wait for the device every step, and the PK
    # sampler already guarantees at least two identities per batch.
    if features.device.type == "cpu" and bool(same.all()):
        raise ValueError("batch-hard triplet loss needs at least two identities in the batch")
    hardest_positive = distances.masked_fill(~same, float("-inf")).amax(dim=1)
    hardest_negative = distances.masked_fill(same, float("inf")).amin(dim=1)
    target = torch.ones_like(hardest_positive)  # "negative should be farther than positive"
    if margin is None:
        return F.soft_margin_loss(hardest_negative - hardest_positive, target)
    return F.margin_ranking_loss(hardest_negative, hardest_positive, target, margin=margin)


class BotLoss(nn.Module):
    """ID loss (CE with label smoothing) on the logits + triplet loss on the pre-BN features,
    summed with equal weights as in BoT. Returns the total and its parts (for logging)."""

    def __init__(self, label_smoothing: float = 0.1, triplet_margin: float | None = 0.3) -> None:
        super().__init__()
        self.cross_entropy = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.triplet_margin = triplet_margin

    def forward(self, output: ReidOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        id_loss = self.cross_entropy(output.logits, labels)
        triplet = batch_hard_triplet_loss(output.features, labels, self.triplet_margin)
        return {"loss": id_loss + triplet, "id_loss": id_loss, "triplet_loss": triplet}
