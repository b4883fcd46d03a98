"""benchmarks/identity_cost.py: the UNet work it counts per phase equals what the recipe implies,
a failed identity fails it, and --tiny keeps a preset's counts with the demo's models."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from core.settings.run import REPO_ROOT
from tests.pipeline_fixtures import save_tiny_models

REFERENCES, REFERENCE_STEPS, TRAIN_STEPS, TRAIN_BATCH = 2, 2, 2, 1
SAMPLES, SAMPLE_STEPS, SAMPLE_BATCH, GUIDANCE = 3, 3, 2, 2.0


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("identity_cost", REPO_ROOT / "benchmarks" / "identity_cost.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


identity_cost = _load_benchmark()


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("identity-cost")
    sd, blip = save_tiny_models(root)
    path = root / "preset.yaml"
    path.write_text(yaml.safe_dump({
        "base": str(REPO_ROOT / "configs" / "demo.yaml"),
        "sequences": {"max_images": 2},
        "caption": {"model": str(blip), "max_new_tokens": 4},
        "generation": {
            "base_model": str(sd), "resolution": [32, 16], "scheduler": "model",
            "reference_images": REFERENCES, "reference_inference_steps": REFERENCE_STEPS,
            "train_steps": TRAIN_STEPS, "train_batch_size": TRAIN_BATCH, "prior_loss_weight": 1.0,
            "samples_per_identity": SAMPLES, "num_inference_steps": SAMPLE_STEPS,
            "sample_batch_size": SAMPLE_BATCH, "guidance_scale": GUIDANCE,
        },
        "filter": {"kind": "reid"},
        "output": {"image_size": [32, 16], "image_format": "png"},
    }))
    return path, sd


def _unet_calls_per_run(sd: Path, steps: int) -> int:
    """The tiny model ships SD v1.4's sampler: PNDM with skip_prk_steps, whose PLMS timesteps
    repeat the first one, so a run of `steps` steps calls the UNet steps + 1 times."""
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler.from_pretrained(sd / "scheduler")
    assert scheduler.config.skip_prk_steps
    scheduler.set_timesteps(steps)
    assert len(scheduler.timesteps) == steps + 1
    return len(scheduler.timesteps)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_counted_unet_work_per_phase_matches_the_recipe(preset, tmp_path: Path, checkpointing: bool) -> None:
    path, sd = preset
    out = tmp_path / "cost.json"
    argv = ["--config", str(path), "--identities", "1", "--device", "cpu", "--json", str(out),
            "--set", f"generation.gradient_checkpointing={str(checkpointing).lower()}"]
    if not checkpointing:
        argv.append("--baseline")
    assert identity_cost.main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"device", "identities", "failed", "phases", "vae"}
    assert report["identities"] == 1 and report["failed"] == [] and report["device"].startswith("cpu")
    phases = report["phases"]
    assert list(phases) == ["caption", "reference_set", "fine_tune", "sample", "filter"]

    cfg = 2  # guidance 2.0 > 1: classifier-free guidance, both halves in one UNet batch
    ref_calls = _unet_calls_per_run(sd, REFERENCE_STEPS)
    sample_calls = _unet_calls_per_run(sd, SAMPLE_STEPS)
    ref_batches = [min(SAMPLE_BATCH, REFERENCES - s) for s in range(0, REFERENCES, SAMPLE_BATCH)]  # [2]
    sample_batches = [min(SAMPLE_BATCH, SAMPLES - s) for s in range(0, SAMPLES, SAMPLE_BATCH)]  # [2, 1]
    assert len(ref_batches) == math.ceil(REFERENCES / SAMPLE_BATCH)
    per_training_image = 4 if checkpointing else 3  # forward + backward (2x), + recompute
    expected = {
        "caption": (0, 0),
        "reference_set": (len(ref_batches) * ref_calls, sum(ref_calls * b * cfg for b in ref_batches)),
        # instance + prior images in one forward per step
        "fine_tune": (TRAIN_STEPS, TRAIN_STEPS * TRAIN_BATCH * 2 * per_training_image),
        "sample": (len(sample_batches) * sample_calls, sum(sample_calls * b * cfg for b in sample_batches)),
        "filter": (0, 0),
    }
    assert expected["reference_set"] == (3, 12) and expected["sample"] == (8, 24)
    for phase, (calls, equivalents) in expected.items():
        got = phases[phase]
        assert (got["unet_calls"], got["unet_forward_equivalents"]) == (calls, equivalents), phase
        assert got["seconds"] > 0 and got["peak_memory_bytes"] > 0, phase
        if checkpointing or phase in ("caption", "filter"):
            assert got["baseline_seconds"] is None, phase
        else:
            assert got["baseline_seconds"] > 0, phase
    # The VAE's work as spans of the phase that calls it (calls of encode/decode, images): the
    # reference previews; the instance images and the reference set encoded, the set decoded
    # first (`reference_latents: reencoded`); the samples decoded.
    spans = {key: (span["calls"], span["images"]) for key, span in report["vae"].items()}
    assert spans == {"reference_set/vae_decode": (1, REFERENCES), "fine_tune/vae_encode": (2, 2 + REFERENCES),
                     "fine_tune/vae_decode": (1, REFERENCES), "sample/vae_decode": (1, SAMPLES)}
    assert all(span["peak_memory_bytes"] > 0 and span["wall_seconds"] > 0 for span in report["vae"].values())


@pytest.mark.parametrize("entry", ["bench/1", "bench/0:oom"])
def test_a_failed_identity_fails_the_benchmark(preset, tmp_path: Path, capsys, entry: str) -> None:
    path, _ = preset
    out = tmp_path / "cost.json"
    argv = ["--config", str(path), "--identities", "1", "--device", "cpu", "--json", str(out),
            "--set", f"generation.debug_fail_identities=[{entry}]", "--set", "generation.max_retries=0"]
    assert identity_cost.main(argv) == 1
    identity = entry.partition(":")[0]
    err = capsys.readouterr().err
    assert f"FAILED: identity {identity}" in err and f"injected failure for {identity}" in err
    if entry.endswith(":oom"):
        assert "OutOfMemoryError" in err
    report = json.loads(out.read_text())
    assert [f["identity"] for f in report["failed"]] == [identity]
    assert all(p["seconds"] is None for p in report["phases"].values())  # never a "0.00 s/identity"


def test_tiny_keeps_the_presets_counts_with_the_demo_models() -> None:
    from core.settings.run import load_run_config

    args = identity_cost.build_parser().parse_args(
        ["--config", str(REPO_ROOT / "configs" / "paper.yaml"), "--tiny", "--set", "generation.train_steps=7"]
    )
    _, config = identity_cost.load_benchmark_config(args)
    paper, demo = load_run_config(REPO_ROOT / "configs" / "paper.yaml"), load_run_config()
    g, p = config.generation, paper.generation
    kept = ("reference_images", "num_inference_steps", "reference_inference_steps", "sample_batch_size",
            "vae_batch_size", "train_batch_size", "samples_per_identity", "scheduler", "finetune",
            "guidance_scale", "mixed_precision", "gradient_checkpointing", "use_8bit_adam")
    assert {k: getattr(g, k) for k in kept} == {k: getattr(p, k) for k in kept}
    assert g.train_steps == 7  # --set applies after --tiny
    assert g.base_model == demo.generation.base_model and g.resolution == demo.generation.resolution
    assert config.output.image_size == demo.output.image_size
    assert config.caption.model == demo.caption.model and config.caption.max_new_tokens == paper.caption.max_new_tokens
    assert config.filter.kind == paper.filter.kind and config.filter.reid == demo.filter.reid
    assert config.sequences.max_images == paper.sequences.max_images
    assert config.filter.clip_model == demo.filter.clip_model
