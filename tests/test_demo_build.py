"""The product's main job on the embedded default, end to end, as a user runs it:
`python -m factory.build --out DIR` (configs/demo.yaml), then the outputs of SPEC "Interfaces".

The demo models are the weights committed in demo/weights, loaded in place, so the whole demo
runs in the default selection: a few CPU minutes. Its shards then feed `python -m trainers.pretrain`, as a user would chain them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from core.settings.run import REPO_ROOT, RunConfig
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
    ray.init(address="local", num_cpus=1, include_dashboard=False)
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


# The experiment's reduced grid on the demo build: 2 arms, 1 seed, tiny sizes.
REDUCED_EXPERIMENT = [
    "experiment.arms=[random,generated]", "experiment.seeds=[0]", "experiment.baseline=random",
    "experiment.concurrency=2",  # the random arm fine-tunes while the generated arm pre-trains
    "pretrain.epochs=2", "pretrain.warmup_epochs=1",
    "downstream.methods=[agw]", "downstream.settings=[fs10]",
    "downstream.train.epochs=2", "downstream.train.warmup_epochs=1", "downstream.train.milestones=[1]",
]


def test_a_filter_only_variant_scores_the_demo_builds_samples_without_generating(demo_out: tuple[Path, str],
                                                                                 tmp_path: Path) -> None:
    """`generation.replay_from`: the same samples, byte for byte, filtered again (here: keep all),
    and no fine-tune or sampling. A replay of a build made with other generation settings is
    refused by the check phase, naming the setting."""
    built, _ = demo_out
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    build = [sys.executable, "-m", "factory.build", "--set", f"generation.replay_from={built}",
             "--set", f"filter.reid_checkpoints.synthetic={built / 'filter_models' / 'synthetic'}"]
    refused = subprocess.run([*build, "--out", str(tmp_path / "refused"), "--set", "generation.train_steps=7"],
                             cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, (refused.stdout + refused.stderr)[-3000:]
    assert "generation.replay_from" in refused.stderr and "generation.train_steps" in refused.stderr
    assert not (tmp_path / "refused" / "manifest.json").exists()

    out = tmp_path / "no-filter"
    result = subprocess.run([*build, "--out", str(out), "--set", "filter.threshold=-1.0"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    original = json.loads((built / "summary.json").read_text())
    assert summary["generated"] == summary["kept"] == summary["output_images"] == original["generated"]
    assert "replay" in summary["stage_seconds"] and not {"fine_tune", "sample"} & set(summary["stage_seconds"])
    for staged in sorted((built / "staging").glob("*.parquet")):
        before, after = pq.read_table(staged), pq.read_table(out / "staging" / staged.name)
        assert after.column("image").to_pylist() == before.column("image").to_pylist()
        assert after.column("seed").equals(before.column("seed")) and all(after.column("kept").to_pylist())
        assert after.column("score").to_pylist() == pytest.approx(before.column("score").to_pylist(), abs=1e-5), \
            "the same images under the same filter model: the same scores"
    assert "replayed from" in (out / "README.md").read_text()


def test_reduced_experiment_on_the_demo_build_then_rerun_trains_nothing(demo_out: tuple[Path, str],
                                                                          tmp_path: Path) -> None:
    """`python -m eval.experiment` as a user runs it: its main build is the demo's (copied in: the
    build step resumes it, generating nothing), the generated arm pre-trains a backbone on its
    shards that timm loads with every key, both arms fine-tune and evaluate; then the same
    command again reads every step back and trains nothing."""
    import shutil

    import timm
    from safetensors.torch import load_file

    built, _ = demo_out
    out = tmp_path / "experiment"
    shutil.copytree(built, out / "builds" / "main")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "eval.experiment", "--out", str(out),
               *[arg for override in REDUCED_EXPERIMENT for arg in ("--set", override)]]
    first = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, (first.stdout + first.stderr)[-6000:]
    assert "nothing generated this run" in first.stdout, "the copied build is resumed, not rebuilt"
    assert "2 chains: 0 done before, 2 to run" in first.stdout

    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs["arm"]) == ["generated", "random"] and set(runs["status"]) == {"done"}
    assert runs["mAP"].between(0, 100).all()
    summary = json.loads((built / "summary.json").read_text())
    generated = runs[runs["arm"] == "generated"].iloc[0]
    assert generated["pretrain_images"] == summary["output_images"]
    table = (out / "results.md").read_text()
    assert "| generated | " in table and "vs random" in table and (out / "plots").is_dir()

    checkpoint = out / "chains" / "generated" / "seed-0" / "pretrain"
    arch = load_config(RunConfig, REPO_ROOT / "configs" / "demo.yaml").pretrain.arch
    loaded = timm.create_model(arch, num_classes=0).load_state_dict(
        load_file(str(checkpoint / "backbone.safetensors")), strict=True)
    assert not loaded.missing_keys and not loaded.unexpected_keys
    assert (checkpoint / "curves.png").stat().st_size > 0
    trained_at = (checkpoint / "backbone.safetensors").stat().st_mtime_ns

    second = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, (second.stdout + second.stderr)[-6000:]
    assert "2 chains: 2 done before, 0 to run" in second.stdout and "(0 chains run now)" in second.stdout
    assert "[build main] done before" in second.stdout and "started a local Ray" not in second.stderr.lower()
    assert (checkpoint / "backbone.safetensors").stat().st_mtime_ns == trained_at
    assert pd.read_csv(out / "runs.csv").equals(runs)
