"""Tests of the downstream evaluation (`eval.downstream`).

Unit tests: Fs/Ss subsets, AGW's pieces on hand-made tensors, config validation, tables, the
initialisations. Integration tests run a reduced grid under Ray Tune on a local cluster (tiny
ResNet-18 at 64x32, one epoch, a procedural dataset of 8 identities), check the outputs, rerun
without retraining, and SIGKILL a run mid-grid then finish it without repeating finished cells.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import timm
import torch
import yaml
from safetensors.torch import save_file

from eval.downstream.agw import (
    AgwLoss,
    AgwModel,
    AgwOptions,
    CenterLoss,
    GeneralizedMeanPooling,
    NonLocalBlock,
    insert_non_local_blocks,
    weighted_regularized_triplet_loss,
)
from core.storage import resolve
from core.settings.downstream import DownstreamConfig
from eval.downstream.inits import resolve_imagenet
from eval.downstream.methods import METHODS, ReidMethod
from eval.downstream.cells import Cell, count_executions, plan_cells
from eval.downstream.runner import check_methods, run_downstream
from eval.downstream.trial import fine_tune_cell
from core.settings.downstream import Setting
from eval.downstream.settings import few_shot_images, small_scale_identities, training_subset
from eval.downstream.tables import results_frame, results_markdown
from core.config import ConfigError, load_config
from core.datasets.base import ImageRecord
from core.datasets.config import SourceConfig
from core.datasets.registry import load_source
from core.settings.run import REPO_ROOT
from trainers.reid.model import ReidOutput
from trainers.weights import WeightsMismatchError, build_backbone

TINY_TRAIN = {
    "arch": "resnet18", "image_size": [64, 32], "epochs": 1, "warmup_epochs": 0, "milestones": [],
    "ids_per_batch": 4, "images_per_id": 2, "pad": 2, "loader_workers": 0, "eval_batch_size": 32,
}


def _records(ids: int, images: int, source: str = "s") -> list[ImageRecord]:
    return [ImageRecord(path=f"/d/{pid:04d}_{i:02d}.jpg", source=source, pid=pid, camid=i % 3, split="train")
            for pid in range(1, ids + 1) for i in range(images)]


def _per_id(records: list[ImageRecord]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for r in records:
        counts[r.pid] = counts.get(r.pid, 0) + 1
    return counts


# ------------------------------------------------------------------------------------------
# settings: Fs / Ss subsets


def test_setting_names_parse_and_label() -> None:
    assert Setting.parse("supervised") == Setting("supervised", 100)
    assert Setting.parse("fs30") == Setting("fs", 30) and Setting.parse("fs30").label == "Fs 30%"
    assert Setting.parse("ss90").name == "ss90"
    for bad in ("fs", "fs0", "fs101", "xs10", "Fs10"):
        with pytest.raises(ValueError):
            Setting.parse(bad)


def test_few_shot_keeps_the_fraction_of_each_identity_with_at_least_two() -> None:
    records = _records(ids=20, images=10) + _records(ids=1, images=1, source="t")
    for percent, expected in ((10, 2), (30, 3), (50, 5), (70, 7), (90, 9)):
        kept = few_shot_images(records, percent, seed=0)
        counts = _per_id([r for r in kept if r.source == "s"])
        assert set(counts.values()) == {expected}, percent  # 10 % of 10 is 1, raised to 2 for triplets
        assert [r for r in kept if r.source == "t"] == records[-1:]  # one image: keeps it
    single = few_shot_images(records, 10, seed=0, min_images_per_id=1)
    assert set(_per_id([r for r in single if r.source == "s"]).values()) == {1}


def test_few_shot_is_deterministic_per_seed_nested_and_order_free() -> None:
    records = _records(ids=15, images=12)
    first = few_shot_images(records, 30, seed=3)
    assert first == few_shot_images(records, 30, seed=3)
    shuffled = [records[i] for i in np.random.default_rng(0).permutation(len(records))]
    assert set(few_shot_images(shuffled, 30, seed=3)) == set(first)
    assert set(few_shot_images(records, 30, seed=4)) != set(first)
    for seed in range(3):
        subsets = [set(few_shot_images(records, p, seed)) for p in (10, 30, 50, 70, 90)]
        assert all(small <= large for small, large in zip(subsets, subsets[1:]))


def test_small_scale_keeps_the_fraction_of_identities_with_all_their_images() -> None:
    records = _records(ids=20, images=5)
    for percent, expected in ((10, 2), (30, 6), (50, 10), (70, 14), (90, 18)):
        kept = small_scale_identities(records, percent, seed=1)
        counts = _per_id(kept)
        assert len(counts) == expected and set(counts.values()) == {5}
    assert len(_per_id(small_scale_identities(_records(ids=5, images=2), 10, seed=0))) == 2  # at least 2 ids
    first = small_scale_identities(records, 30, seed=1)
    assert first == small_scale_identities(records, 30, seed=1)
    assert set(_per_id(first)) != set(_per_id(small_scale_identities(records, 30, seed=2)))
    ids = [set(_per_id(small_scale_identities(records, p, seed=1))) for p in (10, 30, 50, 70, 90)]
    assert all(small <= large for small, large in zip(ids, ids[1:]))


def test_training_subset_drops_distractors() -> None:
    records = _records(ids=4, images=4) + [ImageRecord("/d/0000.jpg", "s", 0, 0, "train", distractor=True)]
    assert len(training_subset(records, Setting("supervised"), seed=0)) == 16
    assert all(not r.distractor for r in training_subset(records, Setting("fs", 50), seed=0))


# ------------------------------------------------------------------------------------------
# AGW


def test_gem_pooling_between_average_and_max() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2)
    assert torch.allclose(GeneralizedMeanPooling(p=1.0)(x), torch.tensor([[2.5]]))
    expected = ((1 + 8 + 27 + 64) / 4) ** (1 / 3)
    assert torch.allclose(GeneralizedMeanPooling(p=3.0)(x), torch.tensor([[expected]]))
    assert abs(GeneralizedMeanPooling(p=50.0)(x).item() - 4.0) < 0.15  # -> max pooling
    gem = GeneralizedMeanPooling(p=3.0)
    out = gem(torch.rand(2, 5, 4, 3))
    assert out.shape == (2, 5)
    out.sum().backward()
    assert gem.p.grad is not None  # p is learned


def test_weighted_regularized_triplet_on_hand_made_features() -> None:
    # Four 1-D features, two identities: a = {0, 1}, b = {3, 7}.
    features = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    labels = torch.tensor([0, 0, 1, 1])
    d = torch.tensor([[0.0, 1, 3, 7], [1, 0, 2, 6], [3, 2, 0, 4], [7, 6, 4, 0]])

    def softmax_mean(values: list[float]) -> float:
        w = np.exp(values) / np.exp(values).sum()
        return float((w * np.asarray(values)).sum())

    # positives include the anchor itself (distance 0), as in the AGW code
    positives = [[0, 1], [1, 0], [0, 4], [4, 0]]
    negatives = [[3, 7], [2, 6], [3, 2], [7, 6]]
    expected = np.mean([
        math.log1p(math.exp(softmax_mean(pos) - float(-softmax_mean([-v for v in neg]))))
        for pos, neg in zip(positives, negatives)
    ])
    loss = weighted_regularized_triplet_loss(features, labels)
    assert torch.isclose(loss, torch.tensor(expected, dtype=loss.dtype), atol=1e-4), (loss, expected)
    assert torch.allclose(torch.cdist(features, features), d)
    # Well separated identities give a smaller loss than mixed ones; gradients are finite.
    far = weighted_regularized_triplet_loss(torch.tensor([[0.0], [0.1], [9.0], [9.1]]), labels)
    assert far < loss
    features.requires_grad_(True)
    weighted_regularized_triplet_loss(features, labels).backward()
    assert torch.isfinite(features.grad).all()
    with pytest.raises(ValueError, match="two identities"):
        weighted_regularized_triplet_loss(features.detach(), torch.zeros(4, dtype=torch.long))


def test_non_local_block_keeps_shape_and_starts_as_identity() -> None:
    block = NonLocalBlock(64, reduction=2)
    x = torch.randn(2, 64, 8, 4)
    assert block(x).shape == x.shape and block.inner == 32
    assert torch.allclose(block(x), x)  # zero-initialised output BN
    torch.nn.init.ones_(block.out[1].weight)
    block.train()
    assert not torch.allclose(block(x), x)


def test_non_local_blocks_go_after_the_last_blocks_of_each_stage() -> None:
    backbone = build_backbone("resnet18", "random", last_stride=1)
    x = torch.randn(2, 3, 64, 32)
    before = backbone.eval()(x)
    insert_non_local_blocks(backbone, {"layer2": 1, "layer3": 2})
    wrapped = [name for name, m in backbone.named_modules() if isinstance(m, NonLocalBlock)]
    assert wrapped == ["layer2.1.1", "layer3.0.1", "layer3.1.1"]
    assert torch.allclose(backbone(x), before, atol=1e-5)  # new blocks start as the identity
    with pytest.raises(ValueError, match="layer3 has 2 blocks"):
        insert_non_local_blocks(build_backbone("resnet18"), {"layer3": 3})
    with pytest.raises(ValueError, match="no stage 'layer9'"):
        insert_non_local_blocks(build_backbone("resnet18"), {"layer9": 1})


def test_agw_model_and_loss() -> None:
    options = AgwOptions(non_local={"layer2": 2, "layer3": 2})
    model = AgwModel(build_backbone("resnet18", "random", last_stride=1), num_classes=3, options=options)
    images, labels = torch.randn(6, 3, 64, 32), torch.tensor([0, 0, 1, 1, 2, 2])
    output = model.train()(images)
    assert isinstance(output, ReidOutput) and output.logits.shape == (6, 3) and output.features.shape == (6, 512)
    assert isinstance(model.pool, GeneralizedMeanPooling)
    loss_fn = AgwLoss(3, model.feature_dim, label_smoothing=0.1, options=options)
    losses = loss_fn(output, labels)
    assert set(losses) == {"loss", "id_loss", "triplet_loss", "center_loss"}
    assert torch.isclose(losses["loss"], losses["id_loss"] + losses["triplet_loss"] + 5e-4 * losses["center_loss"])
    losses["loss"].backward()
    assert model.eval()(images).shape == (6, 512)


def test_center_loss_moves_centres_towards_their_features() -> None:
    center = CenterLoss(num_classes=2, dim=2, alpha=0.5)
    center.centers.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    features = torch.tensor([[2.0, 0.0], [2.0, 2.0]])
    loss = center(features, torch.tensor([0, 0]))
    assert torch.isclose(loss, torch.tensor((4.0 + 8.0) / 2))
    # c0 -= 0.5 * ((0-2) + (0-2), (0-0) + (0-2)) / (1 + 2)
    assert torch.allclose(center.centers, torch.tensor([[2 / 3, 1 / 3], [10.0, 10.0]]))


def test_methods_registry() -> None:
    assert {"bot", "agw"} <= set(METHODS.names())
    with pytest.raises(KeyError, match="unknown downstream method 'pcb'"):
        METHODS.get("pcb")
    with pytest.raises(ConfigError, match=r"downstream.methods: unknown downstream method 'pcb' \(registered: agw, bdb, bot, mgn, sbs\)"):
        check_methods(DownstreamConfig(methods=["pcb"]))  # before Tune: the command's exit 2
    with pytest.raises(ConfigError, match="method_options.agw"):
        METHODS.get("agw").options("agw", {"gem_p": 0.5})
    bot = METHODS.get("bot")
    custom = ReidMethod("test", bot.build_model, bot.build_loss)
    try:
        METHODS.add("bot_test_copy", custom)
        assert METHODS.get("bot_test_copy") is custom
        with pytest.raises(ValueError, match="already registered"):
            METHODS.add("bot_test_copy", custom)
    finally:
        METHODS.remove("bot_test_copy")


# ------------------------------------------------------------------------------------------
# config, grid, tables, initialisations


def test_an_unreadable_benchmark_image_stops_the_run_before_any_trial(tmp_path: Path) -> None:
    """The driver reads every benchmark image once (the trials get the bytes): a truncated file
    is named up front instead of failing trials one by one."""
    from core.datasets.base import DatasetError
    from eval.downstream.runner import read_dataset_images

    dataset = load_source(SourceConfig(kind="synthetic", root=tmp_path / "bench",
                                       generate={"ids": 4, "cameras": 2, "seed": 9}))
    images = read_dataset_images({"tiny": dataset})["tiny"]
    assert set(images) == {r.path for r in (*dataset.train, *dataset.query, *dataset.gallery)}
    broken = Path(dataset.gallery[0].path)
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(DatasetError, match=f"tiny has 1 unreadable images.*{broken.name}"):
        read_dataset_images({"tiny": dataset})


def test_config_validation_names_the_key() -> None:
    with pytest.raises(ConfigError, match="train.seed is set per cell"):
        load_config(DownstreamConfig, overrides=["train.seed=3"])
    with pytest.raises(ConfigError, match="unknown setting 'fs'"):
        load_config(DownstreamConfig, overrides=["settings=[supervised,fs]"])
    with pytest.raises(ConfigError, match="entries repeat"):
        load_config(DownstreamConfig, overrides=["methods=[bot,bot]"])
    with pytest.raises(ConfigError, match="inits"):
        load_config(DownstreamConfig, overrides=["inits=[ours,imagenet21k]"])


def test_paper_and_demo_presets_plan_their_grids() -> None:
    from core.settings.run import load_run_config

    paper = load_run_config(REPO_ROOT / "configs" / "paper.yaml").downstream
    cells = plan_cells(paper)
    fractions = [c for c in cells if c.setting.kind in ("fs", "ss")]
    assert {c.dataset for c in fractions} == {"market1501"} and {c.method for c in fractions} == {"agw"}
    assert len(fractions) == 10 * 3
    by_kind = {kind: [c for c in cells if c.setting.kind == kind] for kind in ("supervised", "unsupervised", "da", "dg")}
    # Table 2: 4 datasets x MGN/AGW/SBS/BDB; Table 4: Market, MSMT17; Table 5: both directions; Table 6: one model
    assert {c.dataset for c in by_kind["supervised"]} == {"cuhk03", "market1501", "personx", "msmt17"}
    assert {c.method for c in by_kind["supervised"]} == {"mgn", "agw", "sbs", "bdb"}
    assert [len(by_kind[k]) for k in by_kind] == [4 * 4 * 3, 2 * 3, 2 * 3, 3]
    assert {c.dataset for c in by_kind["dg"]} == {"market1501+cuhk02+cuhk03+cuhk_sysu"}
    protocol = load_run_config(REPO_ROOT / "configs" / "protocol-demo.yaml").downstream
    assert {c.setting.kind for c in plan_cells(protocol)} == {"supervised", "unsupervised", "da", "dg"}
    check_methods(protocol)  # every method builds on the demo's ResNet-18
    demo = load_run_config(REPO_ROOT / "configs" / "demo.yaml").downstream
    assert demo.datasets[0].generate.seed != 0  # held out from the factory's demo source (seed 0)
    assert len({c.key for c in plan_cells(demo)}) == len(plan_cells(demo))


def test_tables_have_a_row_per_cell_with_deltas() -> None:
    rows = []
    for method in ("bot", "agw"):
        for init, m in (("ours", 50.0), ("random", 40.0)):
            for setting in ("supervised", "fs10"):
                rows.append({"dataset": "d", "method": method, "init": init, "setting": setting,
                             "kind": Setting.parse(setting).kind, "percent": Setting.parse(setting).percent,
                             "seed": 0, "status": "done", "mAP": m, "rank1": m + 20})
        for setting in ("supervised", "fs10"):
            rows.append({"dataset": "d", "method": method, "init": "imagenet", "setting": setting,
                         "kind": Setting.parse(setting).kind, "percent": Setting.parse(setting).percent,
                         "seed": 0, "status": "unavailable", "reason": "offline"})
    frame = results_frame(rows)
    ours = frame[frame["init"] == "ours"]
    assert (ours["delta_mAP_vs_random"] == 10.0).all() and ours["delta_mAP_vs_imagenet"].isna().all()
    markdown = results_markdown(frame, ["bot", "agw"], ["supervised", "fs10"])
    for method in ("BOT", "AGW"):
        for setting in ("supervised", "Fs 10%"):
            assert f"| d | {method} | {setting} | Ours | 50.0/70.0 | 1 | n/a | +10.0/+10.0 |" in markdown
            assert f"| d | {method} | {setting} | Random | 40.0/60.0 | 1 |  |  |" in markdown
            assert f"| d | {method} | {setting} | IN | unavailable | 0 |  |  |" in markdown
    assert "Table 2 layout" in markdown and "Table 3 layout" in markdown and "offline" in markdown


def test_imagenet_weights_from_the_cache_only(tmp_path: Path) -> None:
    start = time.perf_counter()
    missing = resolve_imagenet("resnet18", mode="cache", hf_cache_dir=tmp_path / "empty")
    assert not missing.available and "not in the local" in missing.reason
    assert time.perf_counter() - start < 10  # no network retries
    # A Hugging Face cache holding timm/resnet18.a1_in1k: loaded without any network access.
    snapshot = tmp_path / "hub" / "models--timm--resnet18.a1_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "hub" / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
    (tmp_path / "hub" / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text("abc123")
    reference = timm.create_model("resnet18", num_classes=1000)
    save_file(reference.state_dict(), str(snapshot / "model.safetensors"))
    found = resolve_imagenet("resnet18", mode="cache", hf_cache_dir=tmp_path / "hub")
    assert found.available, found.reason
    assert torch.equal(found.state["conv1.weight"], reference.state_dict()["conv1.weight"])
    assert "fc.weight" not in found.state


# ------------------------------------------------------------------------------------------
# under Ray Tune


@pytest.fixture(scope="module")
def ray_cluster(s3_env):
    # Started after the local S3-compatible server's AWS_* variables are set, so trial workers
    # reach it exactly as they would reach S3.
    context = ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield context
    ray.shutdown()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("downstream")
    torch.manual_seed(1)
    save_file(timm.create_model("resnet18", num_classes=0).state_dict(), str(root / "ours.safetensors"))
    save_file(timm.create_model("resnet34", num_classes=0).state_dict(), str(root / "resnet34.safetensors"))
    return {"root": root, "backbone": root / "ours.safetensors", "wrong": root / "resnet34.safetensors"}


def test_an_unknown_debug_fail_cell_is_refused_before_any_work(tmp_path: Path) -> None:
    config = _tiny_grid(tmp_path, debug_fail_cells=["tiny/bot/random/ss50/seed0"])
    with pytest.raises(ConfigError, match=r"debug_fail_cells: \['tiny/bot/random/ss50/seed0'\] are not cells"):
        run_downstream(config, out_dir=tmp_path / "out")
    assert not (tmp_path / "benchmark").exists() and not (tmp_path / "out").exists()


def _tiny_grid(root: Path, **overrides: object) -> DownstreamConfig:
    data = {
        "datasets": [{"kind": "synthetic", "root": str(root / "benchmark"), "name": "tiny",
                      "generate": {"ids": 8, "cameras": 2, "seed": 7, "images_per_camera": 2}}],
        "methods": ["bot", "agw"],
        "method_options": {"agw": {"non_local": {"layer2": 1, "layer3": 1}}},
        "inits": ["ours", "imagenet", "random"],
        "settings": ["supervised", "fs30"],
        "seeds": [0],
        "imagenet_weights": "cache",
        "train": TINY_TRAIN,
        "plots": True,
    }
    data.update(overrides)
    return DownstreamConfig.model_validate(data)


def test_fine_tune_cell_resumes_from_its_checkpoint(workspace: dict[str, Path], tmp_path: Path) -> None:
    from eval.downstream.inits import random_init
    from trainers.checkpoint import load_training_state, save_training_state

    config = _tiny_grid(workspace["root"], train={**TINY_TRAIN, "epochs": 2}, checkpoint_every=1)
    dataset = load_source(config.datasets[0])
    cell = Cell("tiny", "agw", "random", Setting.parse("fs30"), 0)
    states = []
    result = fine_tune_cell(cell, dataset, config, random_init(), report=lambda m, s: states.append((m, s)))
    assert [m["epoch"] for m, _ in states] == [1, 2]
    assert states[0][1] is not None and states[0][1].epoch == 1 and states[1][1] is None  # none after the last
    assert "center.centers" in states[0][1].loss  # AGW's centre buffers are part of the state
    assert result["train_ids"] == 8 and result["train_images"] == 16 and 0 <= result["mAP"] <= 1
    save_training_state(tmp_path, states[0][1])  # the files a Tune checkpoint holds
    restored = load_training_state(tmp_path)
    assert restored.epoch == 1 and torch.equal(restored.loss["center.centers"], states[0][1].loss["center.centers"])
    resumed = fine_tune_cell(cell, dataset, config, random_init(), restored=restored)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]  # epoch 1 restored, only epoch 2 trained
    assert resumed["history"][0] == result["history"][0]


def test_mismatched_backbone_fails_before_tune_naming_keys(workspace: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(WeightsMismatchError) as excinfo:
        run_downstream(_tiny_grid(workspace["root"]), backbone=workspace["wrong"], out_dir=tmp_path / "out")
    message = str(excinfo.value)
    assert "unexpected keys" in message and "layer1.2.bn1.bias" in message  # resnet34 has 3 blocks per stage
    assert not (tmp_path / "out" / "tune").exists()
    # The CLI reports it as an error, exit code 2, before Ray starts.
    from eval.downstream.__main__ import main

    code = main(["--backbone", str(workspace["wrong"]), "--out", str(tmp_path / "cli")])
    assert code == 2 and not (tmp_path / "cli" / "tune").exists()


def test_small_grid_under_tune_then_rerun_trains_nothing(ray_cluster, workspace: dict[str, Path], bucket: str) -> None:
    """The default-suite check: BoT x {ours, imagenet (unavailable offline), random} x supervised,
    with the backbone and every output on an object store (s3://, a local S3-compatible server):
    trials write their results there, Tune keeps its experiment there, and the rerun finds them."""
    backbone, out = resolve(f"{bucket}/pre/backbone.safetensors"), resolve(f"{bucket}/small")
    backbone.write_bytes(workspace["backbone"].read_bytes())
    config = _tiny_grid(workspace["root"], methods=["bot"], settings=["supervised"], plots=False)
    report = run_downstream(config, backbone=backbone.uri, out_dir=out.uri)
    assert not report.errors and sorted(report.trained) == ["tiny/bot/ours/supervised/seed0",
                                                            "tiny/bot/random/supervised/seed0"]
    assert report.results_csv == f"{out.uri}/results.csv"
    frame = pd.read_csv(io.BytesIO((out / "results.csv").read_bytes())).set_index("init")
    assert list(frame["status"]) == ["done", "unavailable", "done"]
    assert math.isclose(frame.loc["ours", "delta_mAP_vs_random"],
                        frame.loc["ours", "mAP"] - frame.loc["random", "mAP"], abs_tol=0.02)
    assert "| tiny | BOT | supervised | IN | unavailable | 0 |  |  |" in (out / "results.md").read_text()
    assert (out / "tune").is_dir() and (out / "config.yaml").is_file()
    again = run_downstream(config, backbone=backbone.uri, out_dir=out.uri)
    assert again.trained == []
    assert all(count_executions(out, c) == 1 for c in plan_cells(config) if c.init != "imagenet")


# In the default selection: the one real Ray Tune run of the suite (about a minute on 2 cores).
def test_reduced_grid_under_tune_then_rerun_reuses_everything(ray_cluster, workspace: dict[str, Path]) -> None:
    out = workspace["root"] / "grid"
    config = _tiny_grid(workspace["root"])
    report = run_downstream(config, backbone=workspace["backbone"], out_dir=out)
    assert not report.errors, report.errors
    cells = plan_cells(config)
    trained = [c for c in cells if c.init != "imagenet"]
    assert sorted(report.trained) == sorted(c.key for c in trained)
    assert all(count_executions(out, c) == 1 for c in trained)

    frame = pd.read_csv(out / "results.csv")
    assert len(frame) == len(cells) == 2 * 3 * 2
    done = frame[frame["status"] == "done"]
    assert len(done) == 8 and done["mAP"].between(0, 100).all() and done["rank1"].between(0, 100).all()
    assert (frame[frame["init"] == "imagenet"]["status"] == "unavailable").all()
    ours = done[done["init"] == "ours"].set_index(["method", "setting"])
    random = done[done["init"] == "random"].set_index(["method", "setting"])
    assert np.allclose(ours["delta_mAP_vs_random"], ours["mAP"] - random["mAP"], atol=0.02)
    fs = done[done["setting"] == "fs30"]
    assert (fs["train_images"] == 16).all() and (fs["image_fraction"] == 0.5).all()  # 30 % of 4 -> 2 per id

    markdown = (out / "results.md").read_text()
    for method in ("BOT", "AGW"):
        for setting in ("supervised", "Fs 30%"):
            assert f"| tiny | {method} | {setting} | IN | unavailable |" in markdown
            assert f"| tiny | {method} | {setting} | Random |" in markdown
            ours_row = next(line for line in markdown.splitlines()
                            if line.startswith(f"| tiny | {method} | {setting} | Ours |"))
            cols = [c.strip() for c in ours_row.strip("|").split("|")]
            assert "/" in cols[4] and cols[6] == "n/a" and cols[7][0] in "+-"
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert "cmc_tiny_agw_fs30.png" in plots and "fraction_tiny_agw_fs.png" in plots
    assert (out / "config.yaml").exists()

    again = run_downstream(config, backbone=workspace["backbone"], out_dir=out)
    assert again.trained == [] and all(count_executions(out, c) == 1 for c in trained)
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), frame)


def _write_preset(path: Path, root: Path, **downstream: object) -> Path:
    section = {
        "datasets": [{"kind": "synthetic", "root": str(root / "benchmark"), "name": "tiny",
                      "generate": {"ids": 8, "cameras": 2, "seed": 7, "images_per_camera": 2}}],
        "methods": ["bot"], "inits": ["ours", "random"], "settings": ["supervised", "fs30", "ss50"],
        "seeds": [0], "imagenet_weights": "cache", "train": {**TINY_TRAIN, "epochs": 2},
        "fraction_methods": [], "max_concurrent_trials": 1, "plots": False, "checkpoint_every": 1,
        **downstream,
    }
    path.write_text(yaml.safe_dump({"base": str(REPO_ROOT / "configs" / "demo.yaml"), "downstream": section}))
    return path


@pytest.mark.slow  # about 3 minutes on a busy 2-core machine: two CLI runs of 6 cells
def test_killed_run_resumes_without_repeating_finished_trials(ray_cluster, workspace: dict[str, Path]) -> None:
    root = workspace["root"]
    preset = _write_preset(root / "resume.yaml", root)
    out = root / "killed"
    config = DownstreamConfig.model_validate(yaml.safe_load(preset.read_text())["downstream"])
    cells = plan_cells(config)
    assert len(cells) == 6
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address_info["address"], "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    command = [sys.executable, "-m", "eval.downstream", "--config", str(preset), "--backbone",
               str(workspace["backbone"]), "--out", str(out)]

    def finished() -> list[Cell]:
        return [c for c in cells if (c.directory(out) / "result.json").exists()]

    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    while len(finished()) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[0][-4000:]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_at_kill = finished()
    assert 2 <= len(done_at_kill) < len(cells), f"the kill must land mid-grid ({len(done_at_kill)} done)"

    rerun = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"{len(done_at_kill)} already done" in rerun.stdout
    assert len(finished()) == len(cells)
    for cell in done_at_kill:
        assert count_executions(out, cell) == 1, cell.key  # never trained again
    assert all(count_executions(out, c) >= 1 for c in cells)
    frame = pd.read_csv(out / "results.csv")
    assert (frame["status"] == "done").all() and len(frame) == len(cells)
    results = {c.key: json.loads((c.directory(out) / "result.json").read_text()) for c in done_at_kill}
    for key, result in results.items():  # results of the killed run are kept as they were
        assert result["digest"]


def test_saved_config_loads_again(tmp_path: Path) -> None:
    from core.config import save_config

    config = _tiny_grid(tmp_path)
    assert load_config(DownstreamConfig, save_config(config, tmp_path / "config.yaml")) == config


@pytest.mark.slow  # 1-2 minutes on a busy 2-core machine
def test_errored_trial_is_reported_then_resumed_by_tuner_restore(
    ray_cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = DownstreamConfig.model_validate({
        "datasets": [{"kind": "synthetic", "root": str(tmp_path / "benchmark"), "name": "tiny",
                      "generate": {"ids": 8, "cameras": 2, "seed": 7, "images_per_camera": 2}}],
        "methods": ["bot"], "inits": ["random"], "settings": ["supervised", "ss50"], "seeds": [0],
        "train": TINY_TRAIN, "max_failures": 0, "plots": False,
    })
    supervised, small = (Cell("tiny", "bot", "random", Setting.parse(s), 0) for s in ("supervised", "ss50"))
    # The supervised cell's trial fails (unreadable images no longer can: the driver reads every
    # image before any trial starts and stops the run on one).
    out = tmp_path / "out"
    first = run_downstream(config.model_copy(update={"debug_fail_cells": [supervised.key]}), out_dir=out)
    assert list(first.errors) == [supervised.key] and first.trained == [small.key]
    frame = pd.read_csv(out / "results.csv").set_index("setting")
    assert frame.loc["supervised", "status"] == "error" and frame.loc["ss50", "status"] == "done"
    assert "| tiny | BOT | supervised | Random | error |" in (out / "results.md").read_text()

    capsys.readouterr()
    second = run_downstream(config, out_dir=out)
    assert "resuming the Tune experiment" in capsys.readouterr().out
    assert not second.errors and second.trained == [supervised.key]
    assert count_executions(out, small) == 1 and count_executions(out, supervised) == 2
    assert (pd.read_csv(out / "results.csv")["status"] == "done").all()
