"""benchmarks/gpu_check.py: the prepared GPU check runs (--tiny: the same code path on the CPU with
tiny models and counts), writes every section, and never imports Ray (the GPU machine has none)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"
PRESETS = ("paper.yaml", "paper-fast.yaml")
PHASES = ("caption", "reference_set", "fine_tune", "sample", "vae_decode", "other")


def test_tiny_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--json", str(out)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())

    assert report["tiny"] is True
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["packages"]["diffusers"]
    assert env["ray_imported"] == []
    assert set(report["status"]) == {"caption", "reid", "pretrain", *(f"generation:{p}" for p in PRESETS)}
    assert all(value == "ok" for value in report["status"].values()), report["status"]

    for preset in PRESETS:
        assert report["presets"][preset]["full_counts"]["samples_per_identity"] == 150
        caption = report["caption"][preset]
        assert caption["seconds"] > 0 and caption["prompt"].startswith("a photo of")
        generation = report["generation"][preset]
        assert all(check == "ok" for check in generation["unet_work_check"].values()), generation["unet_work_check"]
        measured, full = generation["measured_counts"], generation["full_counts"]
        assert all(measured[key] <= full[key] for key in full)
        identity = report["identity"][preset]
        assert tuple(identity["phases"]) == PHASES
        for phase in PHASES:
            row = identity["phases"][phase]
            assert row["full_seconds"] >= 0 and row["seconds"] >= 0
        assert identity["phases"]["fine_tune"]["step_seconds"] > 0
        assert identity["gpu_seconds_per_identity"] == sum(r["full_seconds"] for r in identity["phases"].values())
        assert identity["vs_paper"] == identity["gpu_seconds_per_identity"] / 400.0
        sampling = report["sampling"][preset]
        assert set(sampling["variants"]) == {"ours", "plain", "plain_half_weights"}
        calls = {v["unet_calls"] for v in sampling["variants"].values()}
        assert len(calls) == 1 and calls.pop() > 0  # the same sampling work in each variant
    # paper.yaml's 8-bit Adam cannot run on a CPU: measured with AdamW, the 8-bit memory estimated
    assert report["identity"]["paper.yaml"]["notes"][0].startswith("use_8bit_adam")

    for section in ("reid_step", "pretrain_step"):
        steps = report[section]
        assert steps["fp32"]["images_per_second"] > 0 and steps["mixed"]["images_per_second"] > 0
        assert steps["fp32"]["precision"] == "fp32" and steps["mixed"]["precision"].startswith("bfloat16")
        assert steps["speedup"] > 0


def test_imports_no_ray() -> None:
    """Importing the check and every module it uses leaves Ray unloaded."""
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import gpu_check; "
        "import trainers.reid.model, trainers.reid.losses, trainers.reid.schedule, trainers.device; "
        "import core.settings.run, factory.stages.generate, factory.stages.caption, trainers.pretrain.recipe; "
        "import identity_cost; "
        "print(gpu_check.ray_modules())"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_skipped_sections_are_recorded(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--json", str(out), "--presets", "configs/paper-fast.yaml",
         "--skip", "caption", "generation", "sampling", "reid", "--budget-seconds", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    status = json.loads(out.read_text())["status"]
    assert status["caption"] == status["reid"] == "skipped (--skip)"
    assert status["generation:paper-fast.yaml"] == "skipped (--skip)"
    assert status["pretrain"].startswith("skipped (budget")
