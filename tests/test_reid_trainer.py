"""Tests of the BoT Re-ID trainer (`trainers.reid`, `trainers.weights`).

Unit tests run on hand-made tensors and tiny in-memory datasets drawn into tmp_path; one
integration test trains for real on a local Ray cluster; the slow acceptance test trains the
demo preset on the procedural dataset and checks the figures the brief asks for.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import ray
import timm
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from core.config import load_config
from core.datasets.base import ImageRecord, ReidDataset
from core.settings.reid import ReidTrainConfig
from trainers.reid import (
    BotLoss,
    PKBatchSampler,
    ReidOutput,
    batch_hard_triplet_loss,
    build_eval_transform,
    build_lr_scheduler,
    build_optimizer,
    build_reid_model,
    build_train_transform,
    evaluate_reid,
    extract_features,
    load_reid_model,
    train_reid,
)
from trainers.weights import (
    LastStrideUnsupportedError,
    WeightsMismatchError,
    WeightsUnavailableError,
    build_backbone,
    save_backbone_safetensors,
)

REPO = Path(__file__).resolve().parents[1]
TINY = dict(arch="resnet18", init="random", image_size=(64, 32), loader_workers=0, eval_batch_size=16)


def tiny_config(**overrides: object) -> ReidTrainConfig:
    return ReidTrainConfig(**{**TINY, **overrides})


# ------------------------------------------------------------------------------------------
# tiny in-memory dataset: each identity a colour pair (shirt / trousers), cameras shift the light


def _draw_person(path: Path, pid: int, camid: int, frame: int) -> None:
    rng = np.random.default_rng([pid, camid, frame])
    top = tuple(int(c) for c in np.random.default_rng(pid).integers(0, 256, 3))
    legs = tuple(int(c) for c in np.random.default_rng(pid + 1000).integers(0, 256, 3))
    background = (60 + 40 * camid, 90, 120 - 20 * camid)
    image = Image.new("RGB", (32, 64), background)
    draw = ImageDraw.Draw(image)
    dx = int(rng.integers(-2, 3))
    draw.ellipse((12 + dx, 2, 20 + dx, 10), fill=(230, 190, 160))
    draw.rectangle((9 + dx, 11, 23 + dx, 34), fill=top)
    draw.rectangle((10 + dx, 35, 22 + dx, 60), fill=legs)
    image.save(path, quality=95)


def make_tiny_dataset(root: Path, ids: int = 8, cameras: int = 2, images: int = 2) -> ReidDataset:
    """`ids` training identities and `ids` other test identities, `images` per camera."""
    root.mkdir(parents=True, exist_ok=True)
    dataset = ReidDataset(name="tiny", root=root)
    for pid in range(1, 2 * ids + 1):
        for camid in range(cameras):
            for frame in range(images):
                path = root / f"{pid:04d}_c{camid + 1}_{frame:02d}.jpg"
                _draw_person(path, pid, camid, frame)
                if pid <= ids:
                    split = "train"
                else:
                    split = "query" if frame == 0 and camid == 0 else "gallery"
                record = ImageRecord(path=str(path), source="tiny", pid=pid, camid=camid, split=split, frame=frame)
                getattr(dataset, split).append(record)
    return dataset


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> ReidDataset:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_reid"))


@pytest.fixture(scope="module")
def local_ray(s3_env):
    """A 2-CPU local Ray cluster for the module (or the caller's, if one is already running),
    started after the local S3-compatible server's AWS_* variables are set, so its workers reach
    it exactly as they would reach S3."""
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


# ------------------------------------------------------------------------------------------
# losses


def test_batch_hard_triplet_picks_hardest_positive_and_negative() -> None:
    # 1-D points: anchors 0 and 1 are id 0, anchors 1.5 and 4 are id 1.
    features = torch.tensor([[0.0], [1.0], [1.5], [4.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    # hardest positive / negative distances per anchor:
    d_ap = torch.tensor([1.0, 1.0, 2.5, 2.5])
    d_an = torch.tensor([1.5, 0.5, 0.5, 3.0])
    hinge = batch_hard_triplet_loss(features, labels, margin=0.3)
    assert hinge.item() == pytest.approx(torch.relu(d_ap - d_an + 0.3).mean().item())
    assert hinge.item() == pytest.approx((0.0 + 0.8 + 2.3 + 0.0) / 4)
    soft = batch_hard_triplet_loss(features, labels, margin=None)
    assert soft.item() == pytest.approx(torch.log1p(torch.exp(d_ap - d_an)).mean().item())
    hinge.backward()  # zero self-distances on the diagonal must not produce NaN gradients
    assert torch.isfinite(features.grad).all()


def test_batch_hard_triplet_needs_two_identities() -> None:
    with pytest.raises(ValueError, match="two identities"):
        batch_hard_triplet_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


def test_bot_loss_is_smoothed_ce_plus_triplet() -> None:
    torch.manual_seed(0)
    output = ReidOutput(logits=torch.randn(6, 3), features=torch.randn(6, 5))
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    losses = BotLoss(label_smoothing=0.1, triplet_margin=0.3)(output, labels)
    expected_ce = torch.nn.functional.cross_entropy(output.logits, labels, label_smoothing=0.1)
    assert losses["id_loss"].item() == pytest.approx(expected_ce.item())
    assert losses["loss"].item() == pytest.approx((expected_ce + losses["triplet_loss"]).item())


# ------------------------------------------------------------------------------------------
# PK sampler

# 7 identities with 1..9 images: some below K (sampled with replacement), some with remainders.
LABELS = [label for label, count in enumerate([1, 3, 4, 5, 8, 9, 2]) for _ in range(count)]


def test_pk_sampler_batches_hold_p_ids_times_k_images() -> None:
    sampler = PKBatchSampler(LABELS, ids_per_batch=3, images_per_id=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        assert len(batch) == 12
        counts = Counter(LABELS[i] for i in batch)
        assert len(counts) == 3 and set(counts.values()) == {4}
    seen_labels = {LABELS[i] for batch in batches for i in batch}
    assert seen_labels <= set(LABELS)


def test_pk_sampler_is_deterministic_per_seed_and_epoch() -> None:
    def batches(seed: int, epoch: int) -> list[list[int]]:
        sampler = PKBatchSampler(LABELS, 3, 4, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert batches(0, 0) == batches(0, 0)
    assert batches(0, 0) != batches(0, 1)
    assert batches(0, 0) != batches(1, 0)


def test_pk_sampler_shards_batches_across_ranks() -> None:
    labels = [label for label in range(20) for _ in range(4)]
    full = PKBatchSampler(labels, 2, 4, seed=3).global_batches(epoch=5)
    shards = []
    for rank in range(3):
        sampler = PKBatchSampler(labels, 2, 4, seed=3, rank=rank, world_size=3)
        sampler.set_epoch(5)
        shards.append(list(sampler))
    per_rank = len(full) // 3
    assert [len(s) for s in shards] == [per_rank] * 3  # equal step counts: DDP cannot hang
    assert sorted(map(tuple, sum(shards, []))) == sorted(map(tuple, full[: per_rank * 3]))


def test_pk_sampler_rejects_fewer_ids_than_p() -> None:
    with pytest.raises(ValueError, match="only 2 identities"):
        PKBatchSampler([0, 0, 1, 1], ids_per_batch=3, images_per_id=2)


# ------------------------------------------------------------------------------------------
# model, backbone weights


def test_last_stride_one_doubles_the_final_feature_map() -> None:
    images = torch.randn(1, 3, 128, 64)
    with torch.no_grad():
        stride2 = build_backbone("resnet18", "random", last_stride=2).eval()(images)
        stride1 = build_backbone("resnet18", "random", last_stride=1).eval()(images)
    assert stride2.shape[-2:] == (4, 2)
    assert stride1.shape[-2:] == (8, 4)
    assert stride1.shape[1] == stride2.shape[1] == 512


def test_last_stride_one_unsupported_arch_is_a_clear_error() -> None:
    with pytest.raises(LastStrideUnsupportedError, match="convnext_atto.*last_stride: 2"):
        build_backbone("convnext_atto", "random", last_stride=1)


def test_bnneck_outputs_in_train_and_eval_mode() -> None:
    model = build_reid_model(tiny_config(), num_classes=5)
    assert model.bottleneck.bias.requires_grad is False
    assert model.classifier.bias is None
    images = torch.randn(4, 3, 64, 32)
    model.train()
    output = model(images)
    assert isinstance(output, ReidOutput)
    assert output.logits.shape == (4, 5)
    assert output.features.shape == (4, 512)
    model.eval()
    with torch.no_grad():
        features = model(images)
    assert features.shape == (4, 512)
    # eval features are the BN-normalised pooled features, not the raw ones
    pooled = model.pool(model.backbone(images))
    assert torch.allclose(features, model.bottleneck(pooled))


def test_backbone_safetensors_roundtrip_through_timm(tmp_path: Path) -> None:
    reference = timm.create_model("resnet18", num_classes=0)
    path = tmp_path / "backbone.safetensors"
    save_file(reference.state_dict(), str(path))
    backbone = build_backbone("resnet18", str(path), last_stride=1)
    for key, value in reference.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value), key

    # and back out: a Re-ID model's backbone export is a timm `num_classes=0` state dict
    model = build_reid_model(tiny_config(init=str(path)), num_classes=3)
    exported = save_backbone_safetensors(model, tmp_path / "export.safetensors")
    fresh = timm.create_model("resnet18", num_classes=0)
    fresh.load_state_dict(load_file(str(exported)), strict=True)
    assert torch.equal(fresh.conv1.weight, reference.conv1.weight)


def test_mismatched_backbone_file_names_the_keys(tmp_path: Path) -> None:
    state = timm.create_model("resnet18", num_classes=0).state_dict()
    del state["layer4.1.bn2.weight"]
    state["head.extra.weight"] = torch.zeros(2)
    state["conv1.weight"] = torch.zeros(1, 3, 7, 7)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsMismatchError) as excinfo:
        build_backbone("resnet18", str(path))
    message = str(excinfo.value)
    assert "missing keys (1): layer4.1.bn2.weight" in message
    assert "unexpected keys (1): head.extra.weight" in message
    assert "conv1.weight" in message and str(path) in message


@pytest.mark.parametrize("offline", ["1", None])
def test_imagenet_init_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: str | None) -> None:
    """An empty cache, and downloads off (HF_HUB_OFFLINE=1, or unset: the hub rule every model
    follows is offline unless told otherwise): the weights cannot come from anywhere, and the
    error says so before any network call."""
    if offline is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    with pytest.raises(WeightsUnavailableError) as excinfo:
        build_backbone("resnet18", "imagenet")
    message = str(excinfo.value)
    assert "ImageNet weights for timm arch 'resnet18' are unavailable" in message
    assert "HF_HUB_OFFLINE=0 allows them" in message and "Hugging Face cache" in message


def test_imagenet_init_reads_the_hub_cache_without_the_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer finds cached timm weights the way the downstream runner and the model
    loaders do (core.hub), with downloads off."""
    from safetensors.torch import save_file

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--timm--resnet18.a1_in1k"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    reference = timm.create_model("resnet18", num_classes=1000)
    save_file(reference.state_dict(), str(repo / "snapshots" / "abc123" / "model.safetensors"))
    backbone = build_backbone("resnet18", "imagenet", last_stride=1)
    assert torch.equal(backbone.state_dict()["conv1.weight"], reference.state_dict()["conv1.weight"])


def test_unknown_arch_names_the_setting() -> None:
    with pytest.raises(ValueError, match="arch 'resnet_nope' is not a timm model"):
        build_backbone("resnet_nope")


# ------------------------------------------------------------------------------------------
# schedule, transforms


def test_lr_warms_up_linearly_then_decays_at_milestones() -> None:
    config = tiny_config(base_lr=1.0, warmup_epochs=2, warmup_factor=0.1, milestones=(4, 6), gamma=0.5)
    optimizer = build_optimizer(torch.nn.Linear(2, 2), config)
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["weight_decay"] == config.weight_decay
    scheduler = build_lr_scheduler(optimizer, config)
    lrs = []
    for epoch in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step(epoch + 1)
    assert lrs == pytest.approx([0.1, 0.55, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25])
    # A run resumed after k epochs continues the same schedule (Re-ID trainer and downstream trials).
    for done in (0, 3, 5):
        resumed = build_optimizer(torch.nn.Linear(2, 2), config)
        build_lr_scheduler(resumed, config, done)
        assert resumed.param_groups[0]["lr"] == pytest.approx(lrs[done])


def test_milestones_inside_warmup_are_rejected() -> None:
    config = tiny_config(warmup_epochs=5, milestones=(3, 8))
    with pytest.raises(ValueError, match="milestones"):
        build_lr_scheduler(build_optimizer(torch.nn.Linear(2, 2), config), config)


def test_transforms_produce_normalised_tensors_of_image_size() -> None:
    config = tiny_config(image_size=(32, 16))
    image = Image.new("RGB", (40, 90), (128, 30, 200))
    train = build_train_transform(config)(image)
    evaluation = build_eval_transform(config)(image)
    assert train.shape == evaluation.shape == (3, 32, 16)
    assert evaluation.dtype == torch.float32
    assert evaluation.mean().abs() < 3  # normalised, not 0..255


# ------------------------------------------------------------------------------------------
# features, evaluation, training under Ray


def test_extract_features_and_evaluate(tiny_dataset: ReidDataset) -> None:
    config = tiny_config()
    model = build_reid_model(config, num_classes=8)
    feats, pids, camids = extract_features(model, tiny_dataset.query, config, batch_size=5, device="cpu")
    assert feats.shape == (len(tiny_dataset.query), 512)
    assert torch.allclose(feats.norm(dim=1), torch.ones(len(feats)), atol=1e-5)
    assert list(pids) == [r.pid for r in tiny_dataset.query]
    assert list(camids) == [r.camid for r in tiny_dataset.query]
    assert model.training  # mode restored
    metrics = evaluate_reid(model, tiny_dataset, config, device="cpu")
    assert set(metrics) == {"mAP", "rank1", "rank5", "rank10", "mINP", "cmc"}
    assert 0 <= metrics["mAP"] <= 1 and 0 <= metrics["rank1"] <= metrics["rank5"] <= 1


def test_checkpoint_roundtrip_restores_model_optimizer_and_history(tmp_path: Path) -> None:
    from ray.train import Checkpoint

    from trainers.ray_train import read_checkpoint
    from trainers.reid.train import write_checkpoint

    config = tiny_config()
    model = build_reid_model(config, num_classes=4)
    optimizer = build_optimizer(model, config)
    model(torch.randn(4, 3, 64, 32)).logits.sum().backward()
    optimizer.step()  # gives Adam some state to save
    history = [{"epoch": 1, "loss": 1.5}, {"epoch": 2, "loss": 1.2}]
    write_checkpoint(tmp_path, model, optimizer, 2, history)

    restored, _ = read_checkpoint(Checkpoint.from_directory(tmp_path))
    assert restored is not None and restored.epoch == 2 and restored.history == history
    fresh = build_reid_model(config, num_classes=4)
    fresh.load_state_dict(restored.model)
    assert torch.equal(fresh.classifier.weight, model.classifier.weight)
    fresh_optimizer = build_optimizer(fresh, config)
    fresh_optimizer.load_state_dict(restored.optimizer)
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1


def test_train_reid_end_to_end_on_local_ray(local_ray: None, tiny_dataset: ReidDataset, tmp_path: Path) -> None:
    config = tiny_config(epochs=2, warmup_epochs=1, milestones=(2,), ids_per_batch=4, images_per_id=2)
    result = train_reid(tiny_dataset, config, tmp_path / "run")

    assert result.num_classes == 8
    assert [m["epoch"] for m in result.history] == [1, 2]
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in result.history)
    assert result.history[0]["lr"] == pytest.approx(config.base_lr * config.warmup_factor)
    assert result.model_path.is_file() and result.backbone_path.is_file()
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "config.yaml").is_file()
    assert any(result.run_dir.glob("checkpoint_*/model.safetensors"))

    timm.create_model("resnet18", num_classes=0).load_state_dict(load_file(str(result.backbone_path)))
    model = load_reid_model(result.model_path, config)
    assert model.num_classes == 8 and not model.training
    metrics = evaluate_reid(model, tiny_dataset, config, device="cpu")
    assert 0 <= metrics["mAP"] <= 1


def test_cli_reads_its_source_from_and_writes_to_an_object_store(local_ray: None, bucket: str, tmp_path: Path) -> None:
    """`python -m trainers.reid --source-root s3://... --out s3://...`: the source is fetched once
    to the driver, whose training images travel to the Ray Train worker as bytes; checkpoints,
    weights and the report land on the object store."""
    import pyarrow.fs as pafs

    from core.storage import resolve
    from core.datasets.config import SourceConfig, SyntheticSpec
    from core.datasets.registry import load_source
    from trainers.reid.__main__ import main

    load_source(SourceConfig(kind="synthetic", root=tmp_path / "src", generate=SyntheticSpec(ids=8, cameras=2, seed=4)))
    source, out = resolve(f"{bucket}/src"), resolve(f"{bucket}/bot")
    pafs.copy_files(str(tmp_path / "src"), source.path, destination_filesystem=source.filesystem)
    settings = ["arch=resnet18", "init=random", "image_size=[64,32]", "epochs=1", "warmup_epochs=0", "milestones=[]",
                "ids_per_batch=4", "images_per_id=2", "loader_workers=0", "cpus_per_worker=1"]
    assert main(["--source-root", source.uri, "--out", out.uri, *[a for s in settings for a in ("--set", s)]]) == 0
    report = (out / "report.json").read_json()
    assert report["model_path"] == f"{out.uri}/model.safetensors" and 0 <= report["trained"]["mAP"] <= 1
    assert (out / "backbone.safetensors").is_file() and (out / "reid_train").is_dir()


# ------------------------------------------------------------------------------------------
# acceptance (slow): the demo preset on the procedural dataset


@pytest.mark.slow
def test_demo_preset_beats_untrained_model_on_synthetic_data(local_ray: None, tmp_path: Path) -> None:
    from core.datasets.config import SourceConfig, SyntheticSpec
    from core.datasets.registry import load_source
    from trainers.reid.baseline import run_bot_baseline

    dataset = load_source(SourceConfig(
        kind="synthetic", root=tmp_path / "synthetic", generate=SyntheticSpec(ids=100, cameras=4, seed=0)
    ))
    config = load_config(ReidTrainConfig, REPO / "configs" / "reid_demo.yaml")
    start = time.perf_counter()
    report = run_bot_baseline(dataset, config, tmp_path / "bot")
    elapsed = time.perf_counter() - start
    print(report.summary())
    assert elapsed <= 600
    assert report.trained["mAP"] >= 3 * report.untrained["mAP"]
    assert report.trained["rank1"] >= 0.5


def test_training_set_with_image_bytes_never_opens_a_path(tiny_dataset: ReidDataset) -> None:
    """The filter model's training set carries the bytes the driver read, so a training worker
    on another node needs no access to the source's filesystem: here every path is missing."""
    import dataclasses

    from trainers.reid.data import TrainingSet, make_train_loader

    images = {f"/nowhere/{i}.jpg": Path(r.path).read_bytes() for i, r in enumerate(tiny_dataset.train)}
    records = [dataclasses.replace(r, path=f"/nowhere/{i}.jpg") for i, r in enumerate(tiny_dataset.train)]
    training = TrainingSet.from_records(records, images)
    assert training.images is not None and len(training.images) == len(training.paths)
    config = tiny_config(ids_per_batch=4, images_per_id=2)
    images_batch, labels, _ = next(iter(make_train_loader(training, config)))
    assert images_batch.shape[0] == 8 and labels.shape == (8,)
    with pytest.raises(FileNotFoundError):
        next(iter(make_train_loader(TrainingSet.from_records(records), config)))
    # Evaluation too (the downstream trials score query and gallery from the driver's bytes).
    from trainers.reid.evaluate import extract_features

    features, pids, _ = extract_features(build_reid_model(config, 8), records, config, device="cpu", images=images)
    assert features.shape[0] == len(records) and list(pids) == [r.pid for r in records]


def test_report_checkpoint_hands_the_written_folder_to_the_reporter(tmp_path: Path) -> None:
    from ray import tune

    from trainers.ray_train import report_checkpoint

    seen: list[tuple[dict, object, list[str]]] = []

    def report(metrics: dict, checkpoint=None) -> None:  # what Ray sees while the folder exists
        names = sorted(p.name for p in Path(checkpoint.path).iterdir()) if checkpoint is not None else []
        seen.append((metrics, checkpoint, names))

    report_checkpoint({"epoch": 1}, lambda folder: (folder / "state.json").write_text("{}"), report, tune.Checkpoint)
    report_checkpoint({"epoch": 2}, None, report)
    (first, checkpoint, names), (second, none, _) = seen
    assert first == {"epoch": 1} and isinstance(checkpoint, tune.Checkpoint) and names == ["state.json"]
    assert second == {"epoch": 2} and none is None


# ------------------------------------------------------------------------------------------
# device policy and mixed precision (issue 26)


def test_autocast_dtype_follows_the_device_support() -> None:
    from trainers.device import autocast_dtype

    assert autocast_dtype("cuda", bf16_supported=True) == torch.bfloat16
    assert autocast_dtype("cuda", bf16_supported=False) == torch.float16
    assert autocast_dtype("cpu", bf16_supported=True) is None  # CPU results stay those of fp32


def _no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any CUDA query fail: a process Ray gave no GPU must never ask."""
    def touched(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.cuda was consulted")

    for name in ("is_available", "is_bf16_supported", "device_count", "get_rng_state", "set_rng_state"):
        monkeypatch.setattr(torch.cuda, name, touched)


def test_cpu_precision_and_loaders_never_touch_cuda(tiny_dataset: ReidDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainers.reid.data import TrainingSet, make_eval_loader, make_train_loader, pins_memory
    from trainers.device import Precision

    _no_cuda(monkeypatch)
    precision = Precision.for_device(torch.device("cpu"))
    assert precision.dtype is None and precision.scaler is None and not precision.channels_last
    config = tiny_config(ids_per_batch=4, images_per_id=2)
    assert not make_train_loader(TrainingSet.from_records(tiny_dataset.train), config, device="cpu").pin_memory
    assert not make_eval_loader(tiny_dataset.query, config, device=torch.device("cpu")).pin_memory
    assert pins_memory("cuda:0") and not pins_memory("cpu")


def test_train_worker_with_a_gpu_torch_cannot_use_stops_with_device_unusable(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.train.torch

    from core.device import DeviceUnusable
    from trainers.device import train_worker_device

    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))  # Ray's pick, never reached
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: ["1"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # Ray Train shares a node's GPUs among its workers
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnusable, match=r"\['0', '1'\].*torch cannot use CUDA"):
        train_worker_device()
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    _no_cuda(monkeypatch)
    assert train_worker_device() == torch.device("cpu")


def test_bf16_autocast_step_on_cpu_syncs_with_the_host_once_per_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 autocast runs on a CPU too; the loop keeps its sums on the device and reads them once,
    however many steps (host reads made by the loop's own code are counted)."""
    import sys

    import trainers.reid.train as train_module
    from trainers.device import Precision
    from trainers.reid.train import train_one_epoch

    config = tiny_config(ids_per_batch=2, images_per_id=2)
    torch.manual_seed(0)
    model = build_reid_model(config, num_classes=2)
    optimizer = build_optimizer(model, config)
    loss_fn = BotLoss(config.label_smoothing, config.triplet_margin)
    batch = (torch.randn(4, 3, 64, 32), torch.tensor([0, 0, 1, 1]), torch.zeros(4, dtype=torch.int64))
    reads: list[str] = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: object, _original=original, _name=name) -> object:
            if sys._getframe(1).f_code.co_filename == train_module.__file__:
                reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    before = model.classifier.weight.detach().clone()
    per_epoch = []
    for steps in (1, 3):
        reads.clear()
        metrics = train_one_epoch(model, [batch] * steps, loss_fn, optimizer, torch.device("cpu"),
                                  Precision("cpu", torch.bfloat16))
        per_epoch.append(len(reads))
        assert all(math.isfinite(metrics[k]) for k in ("loss", "id_loss", "triplet_loss"))
        assert 0 <= metrics["train_accuracy"] <= 1
    assert per_epoch == [1, 1]
    assert not torch.equal(model.classifier.weight, before)  # the steps trained


def test_cpu_training_loop_sums_as_the_per_step_floats_did() -> None:
    """The device-side float64 sums give the very numbers the per-step Python floats gave (the
    demo's rows must not move on a CPU)."""
    from trainers.reid.train import train_one_epoch

    config = tiny_config(ids_per_batch=2, images_per_id=2)
    batches = [(torch.randn(4, 3, 64, 32), torch.tensor([0, 0, 1, 1]), torch.zeros(4, dtype=torch.int64))
               for _ in range(3)]
    loss_fn = BotLoss(config.label_smoothing, config.triplet_margin)
    torch.manual_seed(0)
    model = build_reid_model(config, num_classes=2)
    reference = build_reid_model(config, num_classes=2)
    reference.load_state_dict(model.state_dict())
    metrics = train_one_epoch(model, batches, loss_fn, build_optimizer(model, config), torch.device("cpu"))
    optimizer = build_optimizer(reference, config)
    totals: dict[str, float] = {}
    correct = 0
    for images, labels, _ in batches:  # the loop as it was: a host read per value per step
        output = reference(images)
        losses = loss_fn(output, labels)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        for name, value in losses.items():
            totals[name] = totals.get(name, 0.0) + float(value.detach())
        correct += int((output.logits.argmax(dim=1) == labels).sum())
    assert {name: metrics[name] for name in totals} == {name: total / 3 for name, total in totals.items()}
    assert metrics["train_accuracy"] == correct / 12
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
