"""What multi-branch Re-ID models (MGN, BDB) return in training, and their loss: an identity
classifier per feature and a batch-hard triplet loss on some of them, summed with weights.

The training loop reads `output.logits` for its accuracy; a `BranchOutput` keeps there the first
(global) branch's logits, and every branch's logits and triplet features beside them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from trainers.reid.losses import batch_hard_triplet_loss


class BranchOutput(NamedTuple):
    """A multi-branch model's training-mode output."""

    logits: torch.Tensor  # (N, num_classes) of the global branch: the loop's training accuracy
    features: torch.Tensor  # (N, dim) the global branch's triplet feature
    id_logits: tuple[torch.Tensor, ...]  # every classifier's (N, num_classes), `logits` first
    triplet_features: tuple[torch.Tensor, ...]  # every feature the triplet loss sees, `features` first


class BranchLoss(nn.Module):
    """`id_weight * sum(CE(logits_i))  + triplet_weight * sum(triplet(features_j))`: the
    authors' weighting as weights (MGN: means, 1/8 and 1/3; BDB: plain sums). CE with
    `label_smoothing`; the triplet loss batch-hard with `triplet_margin` (None: soft margin)."""

    def __init__(self, label_smoothing: float, triplet_margin: float | None, id_weight: float = 1.0,
                 triplet_weight: float = 1.0) -> None:
        super().__init__()
        self.cross_entropy = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.triplet_margin = triplet_margin
        self.id_weight, self.triplet_weight = id_weight, triplet_weight

    def forward(self, output: BranchOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        id_loss = self.id_weight * sum(self.cross_entropy(logits, labels) for logits in output.id_logits)
        triplet = self.triplet_weight * sum(batch_hard_triplet_loss(features, labels, self.triplet_margin)
                                            for features in output.triplet_features)
        return {"loss": id_loss + triplet, "id_loss": id_loss, "triplet_loss": triplet}
