"""The product's main job on the embedded default, end to end, as a user runs it:
`python -m factory.build --out DIR` (configs/demo.yaml), then the outputs of SPEC "Interfaces".

The demo models come from the weights committed in factory/demo/weights (installed into
.cache/demo-models on first use), so the whole demo runs in the default selection: a few CPU
minutes. Its shards then feed `python -m trainers.pretrain`, as a user would chain them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from factory.run_config import REPO_ROOT, RunConfig
from core.config import load_config


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-m", "factory.build", "--out", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return out, result.stdout + result.stderr


def test_demo_prints_progress_and_summary(demo_out: tuple[Path, str]) -> None:
    out, log = demo_out
    assert "== factory.build summary ==" in log
    assert "[1/" in log and "kept" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generated"] > 0 and 0 < summary["kept"] <= summary["generated"]
    assert summary["identities_failed"] == 0


def test_demo_outputs_match_the_interface(demo_out: tuple[Path, str]) -> None:
    out, log = demo_out
    summary = json.loads((out / "summary.json").read_text())
    shards = sorted((out / "shards").glob("*.parquet"))
    assert shards
    table = pa.concat_tables(pq.read_table(s) for s in shards)
    schema = table.schema
    assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert schema.field("pid").type == pa.int64() and schema.field("seed").type == pa.int64()
    for column in ("source", "source_pid", "prompt", "score"):
        assert column in schema.names
    pids = sorted(set(table.column("pid").to_pylist()))
    assert pids == list(range(len(pids))), "pid must be dense over the output"
    assert all("zwx" in p for p in table.column("prompt").to_pylist()), "IIR token in every prompt"
    config = load_config(RunConfig, out / "config.yaml")
    assert min(table.column("score").to_pylist()) >= config.filter.threshold
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["identities"]) == config.sequences.max_identities
    # The dataset is compared with its source, and identities that kept nothing are named.
    empty = sorted(i for i, e in manifest["identities"].items() if not e["kept"])
    assert sorted(summary["identities_without_kept"]) == empty
    if empty:
        assert f"no image kept:   {len(empty)} of" in log
    in_shards = [e for e in manifest["identities"].values() if e["kept"]]
    assert summary["source_images"] == sum(e["source_images"] for e in in_shards) > 0
    assert f"from {summary['source_images']} source training images" in log
    card = (out / "README.md").read_text()
    assert f"| source training images of these identities | {summary['source_images']} |" in card
    assert (out / "README.md").read_text().startswith("# Diffusion-ReID synthetic dataset")
    assert (out / "contact_sheet.png").stat().st_size > 0
    assert yaml.safe_load((out / "config.yaml").read_text())["caption"]["iir_token"] == "zwx"


def test_demo_shards_readable_by_ray_pandas_and_hf_datasets(demo_out: tuple[Path, str]) -> None:
    import datasets
    import pandas as pd
    import ray

    out, _ = demo_out
    frame = pd.read_parquet(out / "shards")
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        assert ray.data.read_parquet(str(out / "shards")).count() == len(frame)
    finally:
        ray.shutdown()
    hf = datasets.load_dataset("parquet", data_files=str(out / "shards" / "*.parquet"), split="train")
    assert len(hf) == len(frame)
    image = hf.cast_column("image", datasets.Image())[0]["image"]
    height, width = load_config(RunConfig, out / "config.yaml").output.image_size
    assert image.size == (width, height)


def test_paper_preset_without_weights_stops_early_naming_the_model(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "factory.build", "--config", "configs/paper.yaml", "--out", str(tmp_path / "o")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "CompVis/stable-diffusion-v1-4" in result.stderr
    assert "--set generation.base_model=" in result.stderr and "cache" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o" / "shards").exists()


def test_demo_shards_pretrain_a_backbone_timm_loads(demo_out: tuple[Path, str], tmp_path: Path) -> None:
    """The demo's shards as `trainers.pretrain` input (the demo preset's `pretrain` section, cut to
    2 epochs here; `-m slow` in tests/test_pretrain.py runs it whole)."""
    import timm
    from safetensors.torch import load_file

    out, _ = demo_out
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-m", "trainers.pretrain", "--data", str(out), "--out", str(tmp_path / "ckpt"),
         "--set", "pretrain.epochs=2", "--set", "pretrain.warmup_epochs=1"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "pretrain: done" in result.stdout
    arch = load_config(RunConfig, REPO_ROOT / "configs" / "demo.yaml").pretrain.arch
    loaded = timm.create_model(arch, num_classes=0).load_state_dict(
        load_file(str(tmp_path / "ckpt" / "backbone.safetensors")), strict=True)
    assert not loaded.missing_keys and not loaded.unexpected_keys
    assert (tmp_path / "ckpt" / "curves.png").stat().st_size > 0
