"""Retrieval evaluation of a Re-ID model under the Market-1501 protocol.

Features are the model's eval-mode output (BoT: the post-BNNeck feature), L2-normalised; the
distance is Euclidean on those, which ranks exactly as cosine distance does (for unit vectors
`|q - g|^2 = 2 - 2 cos`). Metrics come from `core.metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.device import torch_device
from core.metrics import compute_distance_matrix, evaluate_rank
from core.datasets.base import ImageRecord, ReidDataset
from core.settings.reid import ReidTrainConfig
from trainers.reid.data import make_eval_loader
from trainers.weights import unwrap_model


@torch.no_grad()
def extract_features(
    model: nn.Module,
    records: Sequence[ImageRecord],
    config: ReidTrainConfig,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    images: Mapping[str, bytes] | None = None,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(L2-normalised features (N, D) on CPU, pids (N,), camids (N,)) of `records`, in order.

    The model runs in eval mode (restored afterwards) on `device` (default: CUDA if present).
    `images` (path -> encoded bytes) when the caller read them.
    """
    if not records:
        raise ValueError("no records to extract features from")
    module = unwrap_model(model)
    device = torch.device(device if device is not None else torch_device())
    was_training = module.training
    module.to(device).eval()
    features, pids, camids = [], [], []
    try:
        for images, batch_pids, batch_camids in make_eval_loader(records, config, batch_size, images, device):
            features.append(module(images.to(device, non_blocking=True)).float().cpu())
            pids.append(batch_pids.numpy())
            camids.append(batch_camids.numpy())
    finally:
        module.train(was_training)
    return F.normalize(torch.cat(features), dim=1), np.concatenate(pids), np.concatenate(camids)


def evaluate_reid(
    model: nn.Module,
    dataset: ReidDataset,
    config: ReidTrainConfig,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    max_rank: int = 50,
    images: Mapping[str, bytes] | None = None,
) -> dict[str, Any]:
    """mAP, rank1/5/10, mINP (floats in [0, 1]) and the CMC curve (list) of `model` on the
    dataset's query/gallery split. Distractor queries (which have no true match) are left out."""
    query = [r for r in dataset.query if not r.distractor]
    if not query or not dataset.gallery:
        raise ValueError(f"{dataset.name}: evaluation needs query and gallery images "
                         f"(query {len(query)}, gallery {len(dataset.gallery)})")
    q_feats, q_pids, q_camids = extract_features(model, query, config, batch_size, device, images)
    g_feats, g_pids, g_camids = extract_features(model, dataset.gallery, config, batch_size, device, images)
    distmat = compute_distance_matrix(q_feats, g_feats, metric="euclidean")
    cmc, mean_ap, mean_inp = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank)
    return {
        "mAP": float(mean_ap),
        "rank1": float(cmc[0]),
        "rank5": float(cmc[min(4, len(cmc) - 1)]),
        "rank10": float(cmc[min(9, len(cmc) - 1)]),
        "mINP": float(mean_inp),
        "cmc": [float(x) for x in cmc],
    }
