"""Cluster Contrast (eval.downstream.cluster_contrast): the k-reciprocal Jaccard distance and
DBSCAN recover separable clusters, the cluster memory's loss and momentum updates, and the
unsupervised training loop on a tiny procedural dataset, degenerate clusterings included."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

from core.datasets import ReidDataset, SourceConfig, SyntheticSpec, load_source
from core.settings.reid import ReidTrainConfig
from eval.downstream.cluster_contrast import (
    OUTLIER,
    ClusterContrastModel,
    ClusterContrastOptions,
    ClusterMemory,
    cluster_pseudo_labels,
    jaccard_distance,
    train_cluster_contrast,
)
from trainers.weights import build_backbone

BLOBS, BLOB_SIZE, STRAYS = 5, 40, 3


@pytest.fixture(scope="module")
def blobs() -> tuple[torch.Tensor, np.ndarray]:
    """5 tight Gaussian blobs in 64-d (orthogonal centres) and 3 stray points equidistant from
    all of them. A blob has more than k1 = 30 members, so its points' reciprocal neighbours stay
    inside it; the strays neighbour each other and parts of several blobs, and are fewer than
    min_samples: DBSCAN should leave them out."""
    generator = torch.Generator().manual_seed(0)
    centres = 4 * torch.eye(64)[:BLOBS]
    points = [centre + 0.3 * torch.randn(BLOB_SIZE, 64, generator=generator) for centre in centres]
    strays = centres.sum(dim=0) + 0.3 * torch.randn(STRAYS, 64, generator=generator)
    truth = np.r_[np.repeat(np.arange(BLOBS), BLOB_SIZE), np.full(STRAYS, OUTLIER)]
    return torch.cat([*points, strays]), truth


def test_jaccard_distance_is_symmetric_in_unit_range_with_zero_diagonal(blobs) -> None:
    features, truth = blobs
    distance = jaccard_distance(features, k1=30, k2=6)
    n = len(truth)
    assert distance.shape == (n, n) and distance.dtype == torch.float32
    assert torch.equal(distance, distance.T)
    assert float(distance.min()) >= 0 and float(distance.max()) <= 1
    assert torch.equal(distance.diagonal(), torch.zeros(n))
    same = torch.from_numpy(truth[:, None] == truth[None, :]) & torch.from_numpy(truth != OUTLIER)[:, None]
    in_blobs = torch.from_numpy(truth != OUTLIER)
    between = ~same & in_blobs[:, None] & in_blobs[None, :]
    assert float(distance[same].max()) < 0.6 < float(distance[between].min())


def test_jaccard_distance_works_below_k1_images() -> None:
    assert torch.equal(jaccard_distance(torch.randn(1, 8)), torch.zeros(1, 1))
    small = jaccard_distance(torch.randn(3, 8), k1=30, k2=6)  # k1, k2 capped at 2 and 3
    assert small.shape == (3, 3) and torch.equal(small, small.T) and torch.isfinite(small).all()
    # k2 beyond k1 + 1: the query expansion averages over k2 neighbours, not just the k1 + 1 ranked
    features = torch.randn(12, 8, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(jaccard_distance(features, k1=2, k2=6), jaccard_distance(features, k1=2, k2=3))
    with pytest.raises(ValueError):
        jaccard_distance(torch.randn(0, 8))


def test_dbscan_on_jaccard_finds_the_blobs_and_leaves_the_strays_out(blobs) -> None:
    features, truth = blobs
    labels = cluster_pseudo_labels(jaccard_distance(features, k1=30, k2=6), eps=0.6, min_samples=4)
    assert labels.dtype == np.int64 and labels.shape == truth.shape
    clustered = truth != OUTLIER
    assert set(labels[clustered]) == set(range(BLOBS))
    assert adjusted_rand_score(truth[clustered], labels[clustered]) == 1.0
    assert (labels[~clustered] == OUTLIER).all()


# ------------------------------------------------------------------------------------------
# memory


@pytest.mark.parametrize("hard", [True, False])
def test_memory_loss_falls_as_features_move_to_their_centroids(hard: bool) -> None:
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(3)
    features = torch.nn.Parameter(torch.randn(12, 16))
    memory = ClusterMemory(torch.randn(4, 16), temperature=0.05, momentum=0.1, hard=hard)  # far from the features
    optimizer = torch.optim.SGD([features], lr=0.5)
    losses = []
    for _ in range(10):
        loss = memory(features, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.25 * losses[0], losses
    assert torch.allclose(memory.centroids.norm(dim=1), torch.ones(4))


def test_memory_carries_no_gradient_and_scores_with_the_centroids_before_the_update() -> None:
    torch.manual_seed(1)
    labels = torch.tensor([0, 0, 1, 2])
    memory = ClusterMemory(torch.randn(3, 8), temperature=0.05, momentum=0.1)
    before = memory.centroids.clone()
    features = torch.randn(4, 8, requires_grad=True)
    loss = memory(features, labels)
    expected = F.cross_entropy(F.normalize(features, dim=1) @ before.T / 0.05, labels)
    assert torch.allclose(loss, expected)
    loss.backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    assert list(memory.parameters()) == [] and not memory.centroids.requires_grad and memory.centroids.grad is None
    assert not torch.equal(memory.centroids, before)  # moved by the rule, not by gradients
    memory.eval()
    frozen = memory.centroids.clone()
    memory(features.detach(), labels)
    assert torch.equal(memory.centroids, frozen)  # no update outside training


@pytest.mark.parametrize("hard", [True, False])
def test_memory_update_follows_the_documented_rule(hard: bool) -> None:
    centroids = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    memory = ClusterMemory(centroids, momentum=0.1, hard=hard)
    close = F.normalize(torch.tensor([1.0, 0.1, 0.0]), dim=0)
    far = F.normalize(torch.tensor([0.6, 0.8, 0.0]), dim=0)  # the least similar to centroid 0
    other = F.normalize(torch.tensor([0.2, 1.0, 0.3]), dim=0)
    memory(torch.stack([close, far, other]), torch.tensor([0, 0, 1]))
    target = far if hard else (close + far) / 2
    assert torch.allclose(memory.centroids[0], F.normalize(0.1 * centroids[0] + 0.9 * target, dim=0), atol=1e-6)
    assert torch.allclose(memory.centroids[1], F.normalize(0.1 * centroids[1] + 0.9 * other, dim=0), atol=1e-6)
    assert torch.equal(memory.centroids[2], centroids[2])  # not in the batch: untouched


def test_model_gives_unit_features_in_both_modes_and_has_no_classifier() -> None:
    torch.manual_seed(0)
    model = ClusterContrastModel(build_backbone("resnet18", "random", last_stride=1))
    images = torch.randn(4, 3, 64, 32)
    for train in (True, False):
        features = model.train(train)(images)
        assert features.shape == (4, model.feature_dim)
        assert torch.allclose(features.norm(dim=1), torch.ones(4), atol=1e-5)
    assert not model.bottleneck.bias.requires_grad and model.pool.p.requires_grad  # GeM, p learned
    assert not any("classifier" in name for name, _ in model.named_parameters())


# ------------------------------------------------------------------------------------------
# training loop


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> ReidDataset:
    root: Path = tmp_path_factory.mktemp("cluster_contrast") / "synthetic"
    spec = SyntheticSpec(ids=6, cameras=2, images_per_camera=2, seed=0)
    return load_source(SourceConfig(kind="synthetic", root=root, generate=spec))  # 24 training images


def tiny_recipe(epochs: int = 2) -> ReidTrainConfig:
    return ReidTrainConfig(arch="resnet18", init="random", image_size=(64, 32), epochs=epochs, warmup_epochs=0,
                           milestones=(), ids_per_batch=4, images_per_id=2, loader_workers=0, eval_batch_size=32)


def tiny_model() -> ClusterContrastModel:
    torch.manual_seed(0)
    return ClusterContrastModel(build_backbone("resnet18", "random", last_stride=1))


def test_training_clusters_and_trains_every_epoch(synthetic: ReidDataset) -> None:
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = {r.path: Path(r.path).read_bytes() for r in synthetic.train}  # trains from bytes, as trials do
    options = ClusterContrastOptions(k1=6, k2=2, min_samples=2, iters_per_epoch=3)
    reported, lines = [], []
    history = train_cluster_contrast(model, synthetic.train, images, tiny_recipe(), options, "cpu",
                                     report=reported.append, log=lines.append)
    assert [entry["epoch"] for entry in history] == [1, 2] and reported == history and len(lines) == 2
    for entry in history:
        assert entry["clusters"] >= 2 and 0 <= entry["outliers"] < len(synthetic.train)
        assert entry["steps"] == 3  # cycles the PK passes up to iters_per_epoch
        assert math.isfinite(entry["loss"]) and entry["loss"] > 0 and entry["lr"] == pytest.approx(3.5e-4)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_epochs_without_two_clusters_are_skipped_not_fatal(synthetic: ReidDataset) -> None:
    one_per_identity = list({r.pid: r for r in synthetic.train}.values())[:3]
    model = tiny_model()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k}
    lines: list[str] = []
    history = train_cluster_contrast(model, one_per_identity, None, tiny_recipe(), ClusterContrastOptions(), "cpu",
                                     epochs=1, log=lines.append)
    assert history[0]["clusters"] == 0 and history[0]["outliers"] == 3
    assert history[0]["loss"] is None and history[0]["steps"] == 0 and "skipped" in lines[0]
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items() if k in weights)


def test_clusters_of_one_image_still_train(synthetic: ReidDataset) -> None:
    six = list({r.pid: r for r in synthetic.train}.values())
    options = ClusterContrastOptions(eps=1e-6, min_samples=1, k1=5, k2=1)  # every image its own cluster
    history = train_cluster_contrast(tiny_model(), six, None, tiny_recipe(), options, "cpu", epochs=1,
                                     log=lambda _: None)
    assert history[0]["clusters"] == 6 and history[0]["outliers"] == 0
    assert history[0]["steps"] >= 1 and math.isfinite(history[0]["loss"])


def test_camera_centering_makes_clusters_follow_people_not_cameras() -> None:
    from eval.downstream.cluster_contrast import camera_centred

    generator = torch.Generator().manual_seed(0)
    people = torch.nn.functional.normalize(torch.randn(6, 32, generator=generator), dim=1)
    cameras = torch.randn(3, 32, generator=generator) * 3.0  # a camera's background dominates the feature
    pids = np.repeat(np.arange(6), 3 * 5)
    camids = np.tile(np.repeat(np.arange(3), 5), 6)
    features = people[pids] + cameras[camids] + 0.02 * torch.randn(len(pids), 32, generator=generator)
    features = torch.nn.functional.normalize(features, dim=1)
    raw = cluster_pseudo_labels(jaccard_distance(features, 10, 3), 0.5, 4)
    centred = cluster_pseudo_labels(jaccard_distance(camera_centred(features, camids), 10, 3), 0.5, 4)
    # raw: no cluster crosses a camera, so no person is ever matched across cameras
    assert all(len(set(camids[raw == label])) == 1 for label in set(raw) - {-1})
    assert adjusted_rand_score(pids, centred) > 0.7 > adjusted_rand_score(camids, centred)
