"""Tests of backbone pre-training (`trainers.pretrain`).

Unit tests call the recipe, the batch planner, the shard checks and the pipeline stages directly
on small in-memory data; the integration tests train for real under Ray Train on a local 2-CPU
cluster from shards written here with pyarrow (procedural pedestrians, `core.shards.SHARD_SCHEMA`),
so they do not depend on a factory run. The demo-preset acceptance run is marked slow.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from core.config import ConfigError
from core.datasets.config import SyntheticSpec
from core.datasets.market import load_market1501
from core.datasets.synthetic import generate_synthetic_dataset
from core.settings.run import load_run_config
from core.shards import SHARD_SCHEMA
from core.settings.reid import ReidTrainConfig
from trainers.pretrain import BatchPlan, PretrainConfig, plan_batches
from trainers.pretrain.__main__ import main
from trainers.pretrain.data import IMAGE_KEY, LABEL_KEY, DecodeAugment, DecodeCollate
from trainers.pretrain.export import verify_backbone
from trainers.pretrain.plots import write_curves
from trainers.pretrain.recipe import BatchAugment, backbone_state_dict, build_model, build_optimizer, build_scheduler
from trainers.pretrain.shards import ShardError, inspect_shards, write_shards
from trainers.pretrain.train import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    SCHEDULER_FILE,
    STATE_FILE,
    _get_rng_state,
    _set_rng_state,
    find_latest_checkpoint,
)
from trainers.reid.model import build_reid_model
from trainers.weights import WeightsMismatchError, build_backbone

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper.yaml"
DEMO = REPO / "configs" / "demo.yaml"
# A tiny run: small arch and images, a handful of steps per epoch, 2 CPUs shared by all of Ray.
TINY = [
    "pretrain.arch=resnet18", "pretrain.image_size=[64,32]", "pretrain.batch_size=16",
    "pretrain.warmup_epochs=0", "pretrain.lr=1.0e-3", "pretrain.decode_batch_size=32",
    "pretrain.shuffle_buffer=64", "pretrain.cpus_per_worker=1", "pretrain.decode_cpus=1",
    "pretrain.cache_shards=true",
]

TRAINER_DECODE = ["pretrain.decode_on=trainer"]  # the demo's setting; the default (ray_data) is tested too


def sets(*overrides: str) -> list[str]:
    """CLI arguments for `overrides`: --set a=1 --set b=2 ..."""
    return [arg for override in overrides for arg in ("--set", override)]



# ------------------------------------------------------------------------------------------
# shards written here, as the factory writes them


def make_shards(root: Path, ids: int, cameras: int, images_per_camera: int, size: tuple[int, int]) -> Path:
    source = generate_synthetic_dataset(root / "source", SyntheticSpec(
        ids=ids, cameras=cameras, images_per_camera=images_per_camera, seed=0))
    write_shards(load_market1501(source).train, root / "data", image_size=size, rows_per_shard=40)
    return root / "data"


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 identities, ~40 images of 64x32, in two shard files."""
    return make_shards(tmp_path_factory.mktemp("pretrain_small"), ids=6, cameras=2, images_per_camera=4,
                       size=(64, 32))


@pytest.fixture(scope="module")
def local_ray():
    """A 2-CPU local Ray cluster for the module (or the caller's, if one is already running)."""
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    if started:
        ray.shutdown()


def shard_table(data: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((data / "shards").glob("*.parquet")))


def write_table(root: Path, table: pa.Table) -> Path:
    (root / "shards").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / "shards" / "part-00000.parquet")
    return root


# ------------------------------------------------------------------------------------------
# the recipe


def test_paper_preset_is_the_paper_recipe() -> None:
    config = load_run_config(PAPER).pretrain
    assert config.arch == "resnet50"
    assert config.epochs == 300
    assert config.optimizer == "adamw"
    assert config.lr == 4e-3 and config.weight_decay == 0.05
    assert config.warmup_epochs == 20 and config.scheduler == "cosine"
    assert config.batch_size == 512
    assert config.mixup_alpha > 0 and config.cutmix_alpha > 0 and config.mixup_prob > 0  # Mixup + CutMix
    assert config.rand_augment is not None and config.rand_augment.startswith("rand-")  # RandAugment
    assert config.random_erasing > 0  # Random Erasing
    assert config.image_size == (256, 128)
    # and the code defaults are that recipe too
    default = PretrainConfig()
    assert (default.arch, default.epochs, default.lr, default.weight_decay, default.warmup_epochs,
            default.batch_size) == ("resnet50", 300, 4e-3, 0.05, 20, 512)


def expected_lr(epoch: int, base: float, warmup_lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up from warmup_lr to base over `warmup` epochs, then cosine from base to min_lr
    over the remaining epochs (written out here, independently of timm)."""
    if epoch < warmup:
        return warmup_lr + (base - warmup_lr) * epoch / warmup
    progress = (epoch - warmup) / (total - warmup)
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * progress))


def test_paper_learning_rate_schedule() -> None:
    config = load_run_config(PAPER).pretrain
    optimizer = build_optimizer(torch.nn.Linear(4, 2), config)
    assert type(optimizer).__name__ == "AdamW"
    assert optimizer.param_groups[0]["weight_decay"] == 0.05 or optimizer.param_groups[-1]["weight_decay"] == 0.05
    scheduler = build_scheduler(optimizer, config)
    for epoch in (0, 10, 20, 160, 299):
        scheduler.step(epoch)
        want = expected_lr(epoch, 4e-3, config.warmup_lr, config.min_lr, 20, 300)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(want, rel=1e-9, abs=1e-12), epoch
    scheduler.step(20)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(4e-3)  # the peak, right after the warm-up
    scheduler.step(10)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(config.warmup_lr + (4e-3 - config.warmup_lr) / 2)


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("max_batch", [None, 64, 48])
def test_global_batch_is_512_for_any_worker_count(workers: int, max_batch: int | None) -> None:
    plan = plan_batches(512, workers, max_batch, even=True)
    assert plan.num_workers * plan.micro_batch * plan.accumulation_steps == 512
    assert plan.per_worker == 512 // workers
    if max_batch is not None:
        assert plan.micro_batch <= max_batch
    assert plan.micro_batch % 2 == 0


def test_batch_plan_values_and_errors() -> None:
    assert plan_batches(512, 1, 64) == BatchPlan(global_batch=512, num_workers=1, per_worker=512,
                                                 micro_batch=64, accumulation_steps=8)
    assert plan_batches(512, 4, 64).accumulation_steps == 2
    assert plan_batches(512, 4).accumulation_steps == 1
    with pytest.raises(ValueError, match="not divisible"):
        plan_batches(512, 3)
    with pytest.raises(ValueError, match="even"):
        plan_batches(6, 2, even=True)  # 3 images per worker cannot be paired
    with pytest.raises(ConfigError, match="num_workers"):
        load_run_config(PAPER, ["pretrain.num_workers=3"])


def test_config_rejects_crashing_randaugment_and_bad_values() -> None:
    with pytest.raises(ValueError, match="mmax"):
        PretrainConfig(rand_augment="rand-m9-mstd0.5-inc1")
    PretrainConfig(rand_augment="rand-m9-mstd0.5-inc1-mmax9")
    with pytest.raises(ConfigError, match="warmup_epochs"):
        load_run_config(DEMO, ["pretrain.warmup_epochs=50"])
    with pytest.raises(ConfigError, match="pretrain.epochs"):
        load_run_config(DEMO, ["pretrain.epochs=0"])


# ------------------------------------------------------------------------------------------
# pipeline stages, without Ray


def test_decode_augment_stage_on_an_arrow_table(small_shards: Path) -> None:
    config = load_run_config(DEMO, TINY).pretrain
    table = shard_table(small_shards).slice(0, 10)
    out = DecodeAugment(config)(table)
    assert out[IMAGE_KEY].shape == (10, 3, 64, 32) and out[IMAGE_KEY].dtype == np.uint8
    assert out[LABEL_KEY].tolist() == table.column("pid").to_pylist()
    assert out[IMAGE_KEY].std() > 0


def test_decode_collate_returns_tensors(small_shards: Path) -> None:
    """`decode_on: trainer`: the same stage as `iter_torch_batches`' collate_fn."""
    config = load_run_config(DEMO, TINY + TRAINER_DECODE).pretrain
    table = shard_table(small_shards).slice(0, 6)
    batch = DecodeCollate(config)(table)
    assert batch[IMAGE_KEY].dtype == torch.uint8 and batch[IMAGE_KEY].shape == (6, 3, 64, 32)
    assert batch[LABEL_KEY].tolist() == table.column("pid").to_pylist()


def test_batch_augment_mixes_labels_into_soft_targets() -> None:
    config = load_run_config(DEMO, TINY).pretrain
    augment = BatchAugment(config, num_classes=5, device=torch.device("cpu"))
    images = torch.randint(0, 256, (8, 3, 64, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    inputs, targets = augment(images, labels)
    assert inputs.dtype == torch.float32 and inputs.shape == (8, 3, 64, 32)
    assert targets.shape == (8, 5)
    assert torch.allclose(targets.sum(dim=1), torch.ones(8))
    plain = BatchAugment(load_run_config(DEMO, TINY + ["pretrain.mixup_prob=0"]).pretrain, 5, torch.device("cpu"))
    assert torch.equal(plain(images, labels)[1], labels)


def test_rng_state_round_trips_through_weights_only_load(tmp_path: Path) -> None:
    torch.save(_get_rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), __import__("random").random())
    _set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert __import__("random").random() == expected[2]


# ------------------------------------------------------------------------------------------
# bad input: clear errors before any training


def test_inspect_shards_accepts_factory_shards(small_shards: Path) -> None:
    summary = inspect_shards(small_shards)
    assert summary.num_classes == 6 and len(summary.files) == 2
    assert summary.num_rows == shard_table(small_shards).num_rows
    assert pq.read_schema(summary.files[0]).equals(SHARD_SCHEMA, check_metadata=False)


def test_bad_data_dirs_are_named(tmp_path: Path, small_shards: Path) -> None:
    with pytest.raises(ShardError, match="data dir not found: .*missing"):
        inspect_shards(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="no shards/ folder in .*empty"):
        inspect_shards(tmp_path / "empty")
    (tmp_path / "noparquet" / "shards").mkdir(parents=True)
    with pytest.raises(ShardError, match="no Parquet shards in .*noparquet"):
        inspect_shards(tmp_path / "noparquet")

    table = shard_table(small_shards)
    write_table(tmp_path / "nopid", table.drop_columns(["pid"]))
    with pytest.raises(ShardError, match=r"part-00000.parquet lacks required column\(s\) \['pid'\]"):
        inspect_shards(tmp_path / "nopid")
    write_table(tmp_path / "flatimage", table.set_column(0, "image", table.column("image").combine_chunks()
                                                         .field("bytes")))
    with pytest.raises(ShardError, match="'image' must be a struct"):
        inspect_shards(tmp_path / "flatimage")

    gappy = pa.array([2 * p for p in table.column("pid").to_pylist()], pa.int64())  # 0, 2, 4, ...
    write_table(tmp_path / "sparse", table.set_column(1, "pid", gappy))
    with pytest.raises(ShardError, match=r"pid column of .*sparse/shards is not dense: .*missing \[1, 3, 5"):
        inspect_shards(tmp_path / "sparse")
    negative = pa.array([p - 1 for p in table.column("pid").to_pylist()], pa.int64())
    write_table(tmp_path / "negative", table.set_column(1, "pid", negative))
    with pytest.raises(ShardError, match="negative pid -1"):
        inspect_shards(tmp_path / "negative")
    write_table(tmp_path / "norows", table.slice(0, 0))
    with pytest.raises(ShardError, match="hold no rows"):
        inspect_shards(tmp_path / "norows")


def test_cli_reports_bad_input_and_config_errors_before_training(
    tmp_path: Path, small_shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = shard_table(small_shards)
    write_table(tmp_path / "sparse", table.set_column(1, "pid", pa.array(
        [3 * p for p in table.column("pid").to_pylist()], pa.int64())))
    (tmp_path / "empty").mkdir()
    cases = [
        (["--data", str(tmp_path / "missing")], "data dir not found"),
        (["--data", str(tmp_path / "empty")], "no shards/ folder"),
        (["--data", str(tmp_path / "sparse")], "not dense"),
        (["--data", str(small_shards), "--set", "pretrain.epochs=0"], "pretrain.epochs"),
        (["--data", str(small_shards), "--set", "pretrain.no_such_key=1"], "unknown key 'pretrain.no_such_key'"),
        (["--data", str(small_shards), "--set", "pretrain.batch_size=512"], "too few for one step"),
        (["--data", str(small_shards), "--config", str(tmp_path / "nope.yaml")], "config file not found"),
    ]
    for argv, message in cases:
        out = tmp_path / "ckpt"
        assert main([*argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)
        assert not out.exists()  # nothing written: no Ray Train run started


# ------------------------------------------------------------------------------------------
# export, checkpoints, curves


def test_backbone_export_loads_into_timm_and_the_reid_trainer(tmp_path: Path) -> None:
    config = PretrainConfig(arch="resnet18")
    model = build_model(config, num_classes=7)
    path = tmp_path / "backbone.safetensors"
    save_file(backbone_state_dict(model), str(path))
    verify_backbone(path, config)
    timm_model = timm.create_model("resnet18", num_classes=0)
    result = timm_model.load_state_dict(load_file(str(path)), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert "fc.weight" in model.state_dict() and "fc.weight" not in load_file(str(path))
    # accepted by the Re-ID trainer as `init: <path>.safetensors`
    backbone = build_backbone("resnet18", init=str(path))
    assert torch.equal(backbone.state_dict()["conv1.weight"], model.state_dict()["conv1.weight"])
    reid_config = ReidTrainConfig(arch="resnet18", init=str(path), image_size=(64, 32))
    reid_model = build_reid_model(reid_config, num_classes=4)
    assert torch.equal(reid_model.backbone.state_dict()["layer4.1.conv2.weight"],
                       model.state_dict()["layer4.1.conv2.weight"])
    with pytest.raises(WeightsMismatchError, match="missing keys"):
        verify_backbone(path, PretrainConfig(arch="resnet34"))


def test_swin_backbone_at_person_size_exports(tmp_path: Path) -> None:
    """Any timm backbone: Swin at 256x128 through `model_kwargs`, which the export loads with
    (made narrow and shallow here, through the same kwargs, to keep the test fast)."""
    config = PretrainConfig(arch="swin_tiny_patch4_window7_224", model_kwargs={
        "img_size": [256, 128], "window_size": 8, "embed_dim": 16, "depths": [1, 1, 1, 1],
        "num_heads": [1, 1, 1, 1]})
    model = build_model(config, num_classes=3)
    assert model(torch.zeros(2, 3, 256, 128)).shape == (2, 3)
    save_file(backbone_state_dict(model), str(tmp_path / "swin.safetensors"))
    verify_backbone(tmp_path / "swin.safetensors", config)
    timm.create_model(config.arch, num_classes=0, **config.model_kwargs).load_state_dict(
        load_file(str(tmp_path / "swin.safetensors")), strict=True)


def test_find_latest_checkpoint_skips_incomplete_folders(tmp_path: Path) -> None:
    def folder(name: str, epoch: int, complete: bool = True) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / STATE_FILE).write_text(json.dumps({"epoch": epoch}))
        if complete:
            for name in (MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE):
                (path / name).write_bytes(b"x")
        return path

    assert find_latest_checkpoint(tmp_path) is None
    folder("checkpoint_a", 2)
    best = folder("checkpoint_b", 3)
    folder("checkpoint_c", 4, complete=False)  # a driver killed while Ray was writing it
    assert find_latest_checkpoint(tmp_path).uri == str(best)


def test_write_curves(tmp_path: Path) -> None:
    history = [{"epoch": e, "lr": 1e-3 * e, "loss": 3.0 - e, "train_accuracy": 0.1 * e, "steps": 2,
                "images": 32, "epoch_seconds": 1.0, "images_per_second": 32.0} for e in (1, 2, 3)]
    csv_path, png_path = write_curves(history, tmp_path)
    rows = list(csv.DictReader(csv_path.open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert {"loss", "lr", "train_accuracy"} <= set(rows[0])
    assert Image.open(png_path).size[0] > 500


# ------------------------------------------------------------------------------------------
# Ray Train integration


def read_state(out: Path) -> dict:
    return json.loads((find_latest_checkpoint(out / "pretrain") / STATE_FILE).read_text())


@pytest.mark.slow
def test_rerun_with_more_epochs_resumes(tmp_path: Path, small_shards: Path, local_ray: None) -> None:
    out = tmp_path / "ckpt"
    assert main(["--data", str(small_shards), "--out", str(out), *sets(*TINY, *TRAINER_DECODE, "pretrain.epochs=1")]) == 0
    first = read_state(out)
    assert first["epoch"] == 1 and first["starts"] == [0]
    assert main(["--data", str(small_shards), "--out", str(out), *sets(*TINY, *TRAINER_DECODE, "pretrain.epochs=2")]) == 0
    second = read_state(out)
    assert second["epoch"] == 2
    assert second["starts"] == [0, 1]  # continued from epoch 1, not restarted
    assert second["history"][0] == first["history"][0]  # epoch 1 kept, not retrained
    assert [h["epoch"] for h in second["history"]] == [1, 2]

    rows = list(csv.DictReader((out / "curves.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert (out / "curves.png").stat().st_size > 0
    result = timm.create_model("resnet18", num_classes=0).load_state_dict(
        load_file(str(out / "backbone.safetensors")), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert json.loads((out / "backbone.json").read_text())["arch"] == "resnet18"
    assert (out / "config.yaml").is_file()

    # a rerun asking for a different model refuses instead of mixing runs
    assert main(["--data", str(small_shards), "--out", str(out), *sets(*TINY, *TRAINER_DECODE, "pretrain.arch=resnet34")]) == 2


def _epochs_on_disk(out: Path) -> int:
    latest = find_latest_checkpoint(out / "pretrain")
    return json.loads((latest / STATE_FILE).read_text())["epoch"] if latest is not None else 0


@pytest.mark.slow
def test_rerun_after_driver_sigkill_resumes(tmp_path: Path, small_shards: Path) -> None:
    """SIGKILL the whole `python -m trainers.pretrain` process group (driver and the local Ray it
    started) once an epoch is checkpointed; the same command again continues from that epoch."""
    out = tmp_path / "ckpt"
    argv = [sys.executable, "-m", "trainers.pretrain", "--data", str(small_shards), "--out", str(out),
            *sets(*TINY, *TRAINER_DECODE, "pretrain.epochs=8")]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def start() -> subprocess.Popen:
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)

    process = start()
    deadline = time.monotonic() + 600
    while _epochs_on_disk(out) < 1 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_at_kill = _epochs_on_disk(out)
    assert 1 <= done_at_kill < 8, f"the kill must land mid-run (epochs done: {done_at_kill})"

    rerun = start()
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output[-4000:]
    assert "pretrain: resuming from" in output
    state = read_state(out)
    assert state["epoch"] == 8
    assert state["starts"] == [0, done_at_kill]
    assert [h["epoch"] for h in state["history"]] == list(range(1, 9))
    verify_backbone(out / "backbone.safetensors", PretrainConfig(arch="resnet18"))


@pytest.mark.slow
def test_two_workers_survive_a_killed_worker(tmp_path: Path, small_shards: Path, local_ray: None) -> None:
    """Rank 1 exits abruptly at the start of epoch 1 (once); Ray Train restarts the worker group
    from the epoch-1 checkpoint and the run finishes all epochs. Decoding runs as the Ray Data
    `map_batches` stage here (the default), with DDP over gloo between the two CPU workers."""
    out = tmp_path / "ckpt"
    argv = ["--data", str(small_shards), "--out", str(out), *sets(
        *TINY, "pretrain.num_workers=2", "pretrain.cpus_per_worker=0.5", "pretrain.decode_cpus=0.5",
        "pretrain.epochs=3", "pretrain.fault_injection={epoch: 1, rank: 1}", "pretrain.max_failures=1")]
    assert main(argv) == 0
    assert (out / "fault_injected.marker").is_file()
    state = read_state(out)
    assert state["starts"] == [0, 1]  # started at 0, resumed at 1 after the kill
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]
    assert all(h["steps"] >= 1 for h in state["history"])
    assert list((out / "pretrain").glob("checkpoint_*/rng_rank1.pt"))  # both ranks' RNG checkpointed
    verify_backbone(out / "backbone.safetensors", PretrainConfig(arch="resnet18"))


@pytest.mark.slow
def test_demo_preset_pretrains_and_exports(tmp_path: Path, local_ray: None) -> None:
    """The demo preset's `pretrain` section, unchanged, on shards the size of the factory's demo
    output (12 identities x ~4 images at 128x64; tests/test_demo_build.py pretrains on the real one)."""
    data = make_shards(tmp_path, ids=12, cameras=4, images_per_camera=1, size=(128, 64))
    config = load_run_config(DEMO).pretrain
    start = time.perf_counter()
    assert main(["--data", str(data), "--out", str(tmp_path / "ckpt")]) == 0
    seconds = time.perf_counter() - start  # printed, not asserted: timing lives in benchmarks/
    state = read_state(tmp_path / "ckpt")
    assert state["epoch"] == config.epochs
    model = timm.create_model(config.arch, num_classes=0)
    result = model.load_state_dict(load_file(str(tmp_path / "ckpt" / "backbone.safetensors")), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    print(f"demo pre-training: {seconds:.0f} s, {inspect_shards(data).describe()}, "
          f"final loss {state['history'][-1]['loss']:.3f}")



@pytest.mark.slow  # two Ray Train runs: ~3 CPU minutes
def test_pretrain_reads_and_writes_an_object_store(small_shards: Path, bucket: str) -> None:
    """`--data s3://... --out s3://...` (a local S3-compatible server, reached through the AWS_*
    variables only): Ray Data reads the shards, Ray Train checkpoints to the URI, the exports land
    there, and a rerun finds the checkpoint on the object store and resumes instead of retraining."""
    import subprocess
    import sys

    import pyarrow.fs as pafs

    from core.storage import resolve
    from core.settings.run import REPO_ROOT

    data, out = resolve(f"{bucket}/data"), resolve(f"{bucket}/pre")
    pafs.copy_files(str(small_shards), data.path, destination_filesystem=data.filesystem)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "trainers.pretrain", "--data", data.uri, "--out", out.uri,
               *sets(*TINY, *TRAINER_DECODE, "pretrain.epochs=1", "pretrain.batch_size=8")]
    first = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    assert f"backbone {out.uri}/backbone.safetensors" in first.stdout
    for name in ("backbone.safetensors", "backbone.json", "model.safetensors", "curves.csv", "curves.png", "config.yaml"):
        assert (out / name).is_file(), name
    from safetensors.torch import load

    timm.create_model("resnet18", num_classes=0).load_state_dict(load((out / "backbone.safetensors").read_bytes()))
    assert find_latest_checkpoint(out / "pretrain") is not None
    rerun = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-4000:]
    assert f"resuming from {out.uri}/pretrain/checkpoint_" in rerun.stdout


# ------------------------------------------------------------------------------------------
# device policy and mixed precision (issue 26)


def test_rng_state_of_a_cpu_worker_never_touches_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker Ray gave no GPU may still see the node's GPUs through torch; its checkpoint
    neither reads nor restores a CUDA generator."""
    def touched(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.cuda was consulted")

    for name in ("is_available", "get_rng_state", "set_rng_state"):
        monkeypatch.setattr(torch.cuda, name, touched)
    state = _get_rng_state(torch.device("cpu"))
    assert "cuda" not in state
    _set_rng_state({**state, "cuda": torch.zeros(16, dtype=torch.uint8)}, torch.device("cpu"))  # saved on a GPU


def test_pretrain_step_runs_under_bf16_autocast_on_cpu() -> None:
    from trainers.pretrain.recipe import build_loss
    from trainers.pretrain.train import train_one_epoch
    from trainers.device import Precision

    config = load_run_config(DEMO, TINY).pretrain
    plan = plan_batches(8, 1, 4, even=True)  # two micro-batches: accumulation under autocast too
    torch.manual_seed(0)
    model = build_model(config, num_classes=5)
    optimizer = build_optimizer(model, config)
    before = model.fc.weight.detach().clone()
    batches = [{IMAGE_KEY: torch.randint(0, 256, (8, 3, 64, 32), dtype=torch.uint8),
                LABEL_KEY: torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])} for _ in range(2)]
    device = torch.device("cpu")
    metrics = train_one_epoch(model, batches, BatchAugment(config, 5, device), build_loss(config), optimizer, plan,
                              device, Precision("cpu", torch.bfloat16))
    assert metrics["steps"] == 2 and metrics["images"] == 16 and math.isfinite(metrics["loss"])
    assert not torch.equal(model.fc.weight, before)
