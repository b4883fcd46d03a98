"""Cluster Contrast (Dai et al., "Cluster Contrast for Unsupervised Person Re-Identification",
ACCV 2022): unsupervised Re-ID by alternating clustering and contrastive training.

Every epoch: extract L2-normalised features of all training images (eval transforms), turn them
into the k-reciprocal Jaccard distance (Zhong et al., "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017), cluster with DBSCAN (outliers dropped for the epoch), seed a
cluster memory with the normalised cluster means, and train one epoch on the clustered images
with a PK sampler over the pseudo-labels and the InfoNCE loss against the memory. The memory is
updated by momentum after each batch's loss, never by gradients.

Checked against the authors' code (alibaba/cluster-contrast-reid, `examples/
cluster_contrast_train_usl.py`, `clustercontrast/models/{cm,resnet,pooling}.py`,
`clustercontrast/utils/faiss_rerank.py`), written anew here:

- model: backbone (last stride 1) -> GeM pooling (p = 3, learned; the script's default
  `--pooling-type gem`) -> BatchNorm1d with its bias frozen -> L2 normalisation, in training and
  at inference alike; no classifier;
- memory: logits `f . c_k / 0.05`, cross-entropy over the clusters; the centroid update is
  `c <- m c + (1 - m) x`, renormalised, with m = 0.1 in the published commands (m weighs the old
  centroid). The authors' "hard" update takes, per cluster in the batch, the instance least
  similar to its centroid; their default since 11/2021 (README) is the plain momentum update,
  which they apply per instance in batch order; `hard=False` here uses the batch mean of the
  cluster's instances instead, which is the same idea without the order dependence;
- clustering: DBSCAN on the Jaccard distance, `min_samples` 4, `eps` 0.6 (README, Market-1501
  and MSMT17; earlier commands used 0.7 for MSMT17), k1 = 30, k2 = 6; re-clustered every epoch;
- recipe: Adam, lr 3.5e-4, weight decay 5e-4, lr x0.1 every 20 epochs, 50 epochs of 200
  (Market) or 400 (MSMT17) iterations, batches of 16 pseudo-identities x 16 images. Their
  sampler prefers instances from other cameras than the anchor's; the PK sampler here ignores
  cameras (unsupervised: a camera id is side information that the settings may not grant).

Neighbours are exact: top-k on the dense (N, N) distance matrix with torch, on the device the
features are on; fine at Market/Duke scale (N ~ 13k: a few (N, N) matrices, seconds on a GPU).
The authors search them with faiss, which only pays off at MSMT17 scale (N ~ 33k, where the dense
matrices take ~4 GB each); swap the top-k for a faiss index there if memory becomes the limit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from sklearn.cluster import DBSCAN
from timm.layers import SelectAdaptivePool2d
from torch import nn
from torch.utils.data import DataLoader

from core.config import StrictModel
from core.datasets.base import ImageRecord
from core.settings.reid import ReidTrainConfig
from eval.downstream.agw import GeneralizedMeanPooling
from trainers.device import Precision
from trainers.reid.data import TrainingSet, make_train_loader
from trainers.reid.evaluate import extract_features
from trainers.reid.schedule import build_lr_scheduler, build_optimizer

OUTLIER = -1  # DBSCAN's label for a point in no cluster
# Elements of the (N, chunk, nnz) blocks the Jaccard overlap is summed in: 64M floats = 256 MB.
_CHUNK_ELEMENTS = 1 << 26
# Sampler epochs of pass `p` of epoch `e` are `e * _PASSES_PER_EPOCH + p`: distinct PK orders.
_PASSES_PER_EPOCH = 10_000


class ClusterContrastOptions(StrictModel):
    """`downstream.method_options.cluster_contrast`."""

    eps: float = Field(0.6, gt=0, le=1, description="DBSCAN radius on the Jaccard distance "
                       "(authors: 0.6 for Market-1501 and MSMT17; 0.7 in earlier MSMT17 runs)")
    min_samples: int = Field(4, ge=1, description="DBSCAN: neighbours within eps (the point included) of a core point")
    k1: int = Field(30, ge=1, description="k-reciprocal neighbourhood (Zhong et al. 2017)")
    k2: int = Field(6, ge=1, description="query-expansion neighbourhood (1 = none)")
    temperature: float = Field(0.05, gt=0, description="InfoNCE temperature of the cluster memory")
    momentum: float = Field(0.1, ge=0, le=1, description="weight of the old centroid in its update")
    hard: bool = Field(True, description="update a centroid with the batch's instance least similar to it "
                       "(the paper's hard variant), else with the batch mean of its instances")
    pooling: Literal["gem", "avg"] = Field("gem", description="gem: generalised mean, p = 3 learned (authors' default)")
    iters_per_epoch: int | None = Field(None, ge=1, description="training steps per epoch (authors: 200 Market, "
                                        "400 MSMT17); None = one PK pass over the clustered images")
    camera_centering: bool = Field(
        False, description="cluster features with each camera's mean feature removed (the camera labels "
        "unsupervised Re-ID may use, as CAP and ICE do), so clusters follow people, not backgrounds; off in "
        "the authors' Cluster Contrast")


# ------------------------------------------------------------------------------------------
# Pseudo-labels: k-reciprocal Jaccard distance, DBSCAN


def camera_centred(features: torch.Tensor, camids: np.ndarray) -> torch.Tensor:
    """`features` with each camera's mean removed, L2-normalised again: what the clustering sees
    when a camera's background would otherwise group its images (measured on the procedural
    campus: clusters of the raw features agree with cameras, ARI 0.43, not people, 0.07; centred,
    people 0.44, cameras 0.02)."""
    centred = features.clone()
    cameras = torch.as_tensor(camids, device=features.device)
    for camera in torch.unique(cameras):
        members = cameras == camera
        centred[members] -= centred[members].mean(dim=0)
    return F.normalize(centred, dim=1)


def _reciprocal(rank: torch.Tensor, k: int) -> torch.Tensor:
    """(N, N) bool: `j` is among the k + 1 nearest of `i` (itself included) and `i` among `j`'s."""
    n = rank.shape[0]
    near = torch.zeros(n, n, dtype=torch.bool, device=rank.device)
    near.scatter_(1, rank[:, : k + 1], True)
    return near & near.T


def _expanded_neighbourhoods(rank: torch.Tensor, k1: int) -> torch.Tensor:
    """(N, N) bool: Zhong et al.'s robust set R*(i, k1): R(i, k1) plus the R(j, k1/2) of each
    candidate j in it that shares more than 2/3 of its own R(j, k1/2) with R(i, k1)."""
    n = rank.shape[0]
    k_half = int(round(k1 / 2))
    full, half = _reciprocal(rank, k1), _reciprocal(rank, k_half)
    # A reciprocal set is a subset of the top-(k+1) list: index it by that list and a mask.
    candidates = rank[:, : k1 + 1]  # (N, K)
    candidate_in = full.gather(1, candidates)
    half_lists = rank[:, : k_half + 1][candidates]  # (N, K, Kh): each candidate's top-(k/2 + 1)
    half_in = half.gather(1, rank[:, : k_half + 1])[candidates]  # (N, K, Kh): ... its R(j, k/2)
    shared = half_in & full.gather(1, half_lists.reshape(n, -1)).view_as(half_in)
    accepted = candidate_in & (shared.sum(-1) > 2 / 3 * half_in.sum(-1))
    added = accepted[..., None] & half_in
    # Entries not added point at i itself, which R(i, k1) holds already: one scatter of True.
    own = torch.arange(n, device=rank.device)[:, None, None].expand_as(half_lists)
    expanded = full.clone()
    expanded.scatter_(1, torch.where(added, half_lists, own).reshape(n, -1), True)
    return expanded


def _query_expansion(weights: torch.Tensor, rank: torch.Tensor, k2: int) -> torch.Tensor:
    """Each row replaced by the mean of its k2 nearest rows (itself included), in row chunks."""
    n = weights.shape[0]
    chunk = max(1, _CHUNK_ELEMENTS // (k2 * n))
    return torch.cat([weights[rank[start : start + chunk, :k2]].mean(dim=1) for start in range(0, n, chunk)])


def _overlap(weights: torch.Tensor) -> torch.Tensor:
    """(N, N) `sum_k min(V_ik, V_jk)`, gathered over each row's non-zero columns only (V is sparse:
    a dense N^3 minimum would not fit; the authors loop over an inverted index for the same)."""
    n = weights.shape[0]
    nonzero = (weights > 0).sum(dim=1)
    widest = max(1, int(nonzero.max()))
    chunk = max(1, _CHUNK_ELEMENTS // (n * widest))
    columns_first = weights.T.contiguous()  # gathering whole rows of it is a copy, not a strided walk
    overlap = torch.empty_like(weights)
    for start in range(0, n, chunk):
        rows = weights[start : start + chunk]
        values, columns = rows.topk(int(nonzero[start : start + chunk].max()), dim=1)  # zero-padded
        others = columns_first[columns]  # (chunk, nnz, N): column k of V, for each k of row i
        overlap[start : start + chunk] = torch.minimum(others, values[..., None]).sum(dim=1)
    return overlap


@torch.no_grad()
def jaccard_distance(features: torch.Tensor, k1: int = 30, k2: int = 6) -> torch.Tensor:
    """(N, N) k-reciprocal Jaccard distance of `features` (Zhong et al. 2017), symmetric, in
    [0, 1], zero on the diagonal; float32 on the features' device.

    Features are L2-normalised first; the base distance is the squared Euclidean one of unit
    vectors, `2 - 2 cos`. Each image's neighbourhood R*(i, k1) is weighted by `exp(-d)` and
    normalised (the k-reciprocal encoding V_i), averaged over the k2 nearest neighbours (query
    expansion), and two images are as far apart as `1 - |V_i min V_j| / |V_i max V_j|`. k1 is
    capped at N - 1 and k2 at N, so small sets work (every image then neighbours every other).
    """
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"expected (N, D) features with N >= 1, got {tuple(features.shape)}")
    if k1 < 1 or k2 < 1:
        raise ValueError(f"k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
    n = features.shape[0]
    k1, k2 = min(k1, n - 1), min(k2, n)
    unit = F.normalize(features.float(), dim=1)
    distance = (2 - 2 * unit @ unit.T).clamp_(min=0)
    # Each image first in its own ranking, even where duplicates tie with it at distance 0.
    rank = distance.fill_diagonal_(-1).topk(max(k1 + 1, k2), dim=1, largest=False).indices
    distance.fill_diagonal_(0)
    weights = torch.where(_expanded_neighbourhoods(rank, k1), torch.exp(-distance), 0.0)
    del distance
    weights /= weights.sum(dim=1, keepdim=True)
    if k2 > 1:
        weights = _query_expansion(weights, rank, k2)
    overlap = _overlap(weights)
    del weights
    overlap = (overlap + overlap.T) / 2  # the same sum either way; equal to the last bit after this
    # Rows sum to 1, so |V_i max V_j| = 2 - |V_i min V_j|.
    jaccard = (1 - overlap / (2 - overlap)).clamp_(0, 1)
    return jaccard.fill_diagonal_(0)


def cluster_pseudo_labels(
    distance: torch.Tensor, eps: float, min_samples: int, n_jobs: int | None = None
) -> np.ndarray:
    """DBSCAN on a precomputed (N, N) distance: (N,) int64 labels 0..C-1, `OUTLIER` (-1) for
    images in no cluster."""
    if distance.ndim != 2 or distance.shape[0] != distance.shape[1]:
        raise ValueError(f"expected a square distance matrix, got {tuple(distance.shape)}")
    matrix = distance.detach().float().cpu().numpy()
    labels = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed", n_jobs=n_jobs).fit_predict(matrix)
    return labels.astype(np.int64)


def cluster_centroids(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(C, D) L2-normalised mean feature of each cluster 0..C-1 (`labels` without outliers)."""
    num_clusters = int(labels.max()) + 1
    sums = torch.zeros(num_clusters, features.shape[1], dtype=torch.float32, device=features.device)
    sums.index_add_(0, labels, F.normalize(features.float(), dim=1))
    return F.normalize(sums, dim=1)  # normalising the sum = normalising the mean


# ------------------------------------------------------------------------------------------
# Memory and model


class ClusterMemory(nn.Module):
    """Cluster centroids (C, D), L2-normalised, as a buffer, and the InfoNCE loss against them.

    `forward(features, pseudo_labels)` returns the cross-entropy of `features . centroids^T /
    temperature` with the pseudo-labels; in training mode it then moves the centroid of every
    cluster in the batch: `c <- momentum * c + (1 - momentum) * x`, renormalised, where `x` is the
    cluster's batch instance least similar to `c` (`hard`) or its batch mean. The loss uses the
    centroids as they were before the update, and no gradient ever reaches them: they are a
    buffer, changed only by this rule (the optimiser never sees them). Computed in fp32 even under
    autocast: at temperature 0.05 a bf16 dot product would move the logits by ~0.1.
    """

    centroids: torch.Tensor

    def __init__(self, centroids: torch.Tensor, temperature: float = 0.05, momentum: float = 0.1,
                 hard: bool = True) -> None:
        super().__init__()
        if centroids.ndim != 2 or centroids.shape[0] < 1:
            raise ValueError(f"expected (num_clusters, dim) centroids, got {tuple(centroids.shape)}")
        if temperature <= 0 or not 0 <= momentum <= 1:
            raise ValueError(f"need temperature > 0 and 0 <= momentum <= 1, got {temperature}, {momentum}")
        self.temperature = temperature
        self.momentum = momentum
        self.hard = hard
        self.register_buffer("centroids", F.normalize(centroids.detach().float(), dim=1).clone())

    @classmethod
    def from_clusters(cls, features: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> ClusterMemory:
        """A memory seeded with the normalised mean of each cluster's features (labels 0..C-1)."""
        return cls(cluster_centroids(features, labels), **kwargs)

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[0]

    def forward(self, features: torch.Tensor, pseudo_labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):
            unit = F.normalize(features.float(), dim=1)
            # A snapshot: the update below changes the buffer in place, which backward still reads.
            logits = unit @ self.centroids.clone().T / self.temperature
            loss = F.cross_entropy(logits, pseudo_labels)
        if self.training:
            self.update(unit.detach(), pseudo_labels)
        return loss

    @torch.no_grad()
    def update(self, features: torch.Tensor, pseudo_labels: torch.Tensor) -> None:
        """The momentum update of the clusters present in the batch (unit `features`)."""
        present = torch.unique(pseudo_labels)
        if self.hard:
            similarity = (features * self.centroids[pseudo_labels]).sum(dim=1)
            lowest = torch.full((self.num_clusters,), math.inf, device=features.device)
            lowest.scatter_reduce_(0, pseudo_labels, similarity, reduce="amin")
            # The first instance reaching its cluster's lowest similarity (ties: batch order).
            positions = torch.arange(len(features), device=features.device)
            candidates = torch.where(similarity == lowest[pseudo_labels], positions, len(features))
            chosen = torch.full((self.num_clusters,), len(features), device=features.device)
            chosen.scatter_reduce_(0, pseudo_labels, candidates, reduce="amin")
            target = features[chosen[present]]
        else:
            sums = torch.zeros_like(self.centroids).index_add_(0, pseudo_labels, features)
            counts = torch.bincount(pseudo_labels, minlength=self.num_clusters).to(sums.dtype)
            target = sums[present] / counts[present, None]
        moved = self.momentum * self.centroids[present] + (1 - self.momentum) * target
        self.centroids[present] = F.normalize(moved, dim=1)


class ClusterContrastModel(nn.Module):
    """Backbone feature map -> GeM (or average) pooling -> BatchNorm1d (bias frozen, as BNNeck)
    -> L2 normalisation; the same (N, dim) unit feature in training and eval mode, no classifier
    (the cluster memory plays its part)."""

    def __init__(self, backbone: nn.Module, pooling: Literal["gem", "avg"] = "gem", gem_p: float = 3.0) -> None:
        super().__init__()
        if pooling not in ("gem", "avg"):
            raise ValueError(f"pooling must be 'gem' or 'avg', got {pooling!r}")
        dim = int(backbone.num_features)
        self.backbone = backbone
        self.pool = (GeneralizedMeanPooling(gem_p) if pooling == "gem"
                     else SelectAdaptivePool2d(pool_type="avg", flatten=True))
        self.bottleneck = nn.BatchNorm1d(dim)
        nn.init.ones_(self.bottleneck.weight)
        nn.init.zeros_(self.bottleneck.bias)
        self.bottleneck.bias.requires_grad_(False)

    @classmethod
    def from_options(cls, backbone: nn.Module, options: ClusterContrastOptions) -> ClusterContrastModel:
        return cls(backbone, options.pooling)

    @property
    def feature_dim(self) -> int:
        return self.bottleneck.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feature_map = self.backbone.forward_features(images)
        if feature_map.ndim != 4:
            raise ValueError(f"backbone features have shape {tuple(feature_map.shape)}; ClusterContrastModel "
                             "needs an (N, C, H, W) feature map (a CNN backbone)")
        return F.normalize(self.bottleneck(self.pool(feature_map)), dim=1)


# ------------------------------------------------------------------------------------------
# Training


def _batches(loader: DataLoader, epoch: int, iterations: int | None) -> Iterator[Any]:
    """One PK pass over `loader` (iterations None), else `iterations` batches, starting a new
    pass (a new PK order) whenever one runs out, as the authors' `IterLoader` does."""
    if len(loader) == 0:
        raise RuntimeError("the PK sampler produced no batch; lower ids_per_batch")
    done = 0
    for pass_index in range(_PASSES_PER_EPOCH):
        loader.batch_sampler.set_epoch(epoch * _PASSES_PER_EPOCH + pass_index)
        for batch in loader:
            yield batch
            done += 1
            if iterations is not None and done >= iterations:
                return
        if iterations is None:
            return


def _train_on_clusters(model: nn.Module, memory: ClusterMemory, loader: DataLoader, optimizer: torch.optim.Optimizer,
                       device: torch.device, precision: Precision, epoch: int,
                       iterations: int | None) -> dict[str, float]:
    """One epoch of memory InfoNCE steps; mean loss, steps and throughput (one host sync)."""
    model.train()
    memory.train()
    total = torch.zeros((), dtype=torch.float64, device=device)
    steps = seen = 0
    start = time.perf_counter()
    for images, labels, _ in _batches(loader, epoch, iterations):
        images = images.to(device, non_blocking=True, memory_format=precision.memory_format)
        labels = labels.to(device, non_blocking=True)
        with precision.autocast():
            features = model(images)
        loss = memory(features, labels)  # fp32 inside, outside autocast
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer)
        total += loss.detach().double()
        steps += 1
        seen += len(labels)
    mean_loss = total.item() / steps
    seconds = time.perf_counter() - start
    return {"loss": mean_loss, "steps": steps, "train_seconds": seconds, "images_per_second": seen / seconds}


def train_cluster_contrast(
    model: nn.Module,
    records: Sequence[ImageRecord],
    images: Mapping[str, bytes] | None,
    recipe: ReidTrainConfig,
    options: ClusterContrastOptions,
    device: torch.device | str,
    epochs: int | None = None,
    report: Callable[[dict], None] | None = None,
    log: Callable[[str], None] = print,
    optimizer: torch.optim.Optimizer | None = None,
    start_epoch: int = 0,
) -> list[dict]:
    """Train `model` (a `ClusterContrastModel`) on `records` without their labels; returns one
    history entry per epoch and hands each to `report` as it finishes.

    Every record is used as given (the caller picks the split). Per epoch: features with the eval
    transforms, Jaccard distance, DBSCAN; the clustered images (pid = cluster id) train one epoch
    with the recipe's train transforms and PK sampler (P capped at the clusters found) against a
    fresh `ClusterMemory`. Adam and the lr schedule come from `recipe` (`build_optimizer`,
    `build_lr_scheduler`, stepped every epoch); pass `optimizer` and `start_epoch` to resume.
    An epoch with fewer than 2 clusters trains nothing (logged; `loss` None, `steps` 0).
    Entries: epoch, clusters, outliers, loss, lr, steps, cluster_seconds (+ train timings).
    Mixed precision as `Precision.for_device` decides (autocast on CUDA, fp32 on a CPU), also for
    the feature extraction; the memory loss is always fp32.
    """
    if not records:
        raise ValueError("cluster contrast needs training images, got none")
    device = torch.device(device)
    epochs = recipe.epochs if epochs is None else epochs
    precision = Precision.for_device(device)
    model.to(device, memory_format=precision.memory_format)
    optimizer = optimizer or build_optimizer(model, recipe)
    scheduler = build_lr_scheduler(optimizer, recipe, start_epoch)
    history: list[dict] = []
    for epoch in range(start_epoch, epochs):
        start = time.perf_counter()
        with precision.autocast():
            features, _, camids = extract_features(model, records, recipe, device=device, images=images)
        if options.camera_centering:
            # The memory below starts from these centred features too: its centroids are the
            # camera-free targets the model's features are pulled towards.
            features = camera_centred(features, camids)
        labels = cluster_pseudo_labels(jaccard_distance(features.to(device), options.k1, options.k2),
                                       options.eps, options.min_samples)
        kept = np.flatnonzero(labels != OUTLIER)
        clusters = int(labels.max()) + 1 if len(kept) else 0
        entry: dict[str, Any] = {"epoch": epoch + 1, "clusters": clusters, "outliers": int(len(labels) - len(kept)),
                                 "lr": optimizer.param_groups[0]["lr"],
                                 "cluster_seconds": time.perf_counter() - start}
        if clusters < 2:
            log(f"cluster contrast: epoch {epoch + 1}/{epochs}: {clusters} cluster(s) among {len(records)} "
                "images; nothing to contrast, epoch skipped")
            entry.update(loss=None, steps=0)
        else:
            kept_labels = torch.from_numpy(labels[kept])
            memory = ClusterMemory.from_clusters(
                features[kept].to(device), kept_labels.to(device),
                temperature=options.temperature, momentum=options.momentum, hard=options.hard,
            )
            clustered = [records[i] for i in kept]
            training = TrainingSet(
                paths=[r.path for r in clustered], labels=kept_labels.tolist(), camids=[r.camid for r in clustered],
                pids=list(range(clusters)), images=[images[r.path] for r in clustered] if images is not None else None,
            )
            epoch_recipe = recipe.model_copy(update={"ids_per_batch": min(recipe.ids_per_batch, clusters)})
            loader = make_train_loader(training, epoch_recipe, device=device)
            entry.update(_train_on_clusters(model, memory, loader, optimizer, device, precision, epoch,
                                            options.iters_per_epoch))
            log(f"cluster contrast: epoch {epoch + 1}/{epochs}: {clusters} clusters, {entry['outliers']} outliers, "
                f"loss {entry['loss']:.4f}, lr {entry['lr']:.2e}, {entry['steps']} steps")
        scheduler.step(epoch + 1)
        history.append(entry)
        if report is not None:
            report(dict(entry))
    return history
