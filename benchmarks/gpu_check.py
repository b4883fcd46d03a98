"""One prepared GPU check of the factory's cost figures, sized for a lent GPU machine: its counts
are planned for about 3 minutes on one H100, and `--budget-seconds` (default 330) skips any section
that would start later, so the whole call stays within 6 minutes.

On a lent GPU machine (the `run` tool, kind nvidia-h100-x1; no network, no Ray, no diffusers or
pydantic there): first, here, `bash benchmarks/gpu_check_bundle.sh` puts the wheels that machine
lacks into `.whl/` (git-ignored) and prints this command, to run with `carry: [".whl"]`:

    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \
        PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --json $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log

On a CPU, the same code path with tiny models and counts, in seconds (tests/test_gpu_check.py):

    uv run python benchmarks/gpu_check.py --tiny --json /tmp/gpu_check_tiny.json

What it measures and prints (as tables; `--json PATH` writes every figure, after each section):

- environment: GPU, driver, memory, torch / CUDA / cuDNN, TF32 and bf16 flags, package versions;
- one identity per preset (`--presets`, default configs/paper.yaml and configs/paper-fast.yaml,
  read with the project's own loader `core.config.load_config`): the real stages
  (`CaptionStage`, `GenerationStage`) on SD v1.4 (`UNet2DConditionModel`, `AutoencoderKL`,
  `CLIPTextModel` from their real configs, `benchmarks/full_size_models.py`) and BLIP-2 OPT-2.7b
  (`Blip2ForConditionalGeneration` from a `Blip2Config` of the real sizes, fp16), random weights,
  at the preset's resolution and batch sizes but reduced counts (2 sample batches of reference
  images and samples, 10 sampling steps, 20 train steps), after one warm-up identity. Per phase
  (caption, reference set, fine-tune, sample, VAE decode of the samples, other: restoring the base
  weights, decoding inputs, encoding outputs): seconds and peak GPU memory, extrapolated linearly
  to the preset's full counts (sampling by the recipe's UNet forward-equivalents, the fine-tune as
  a fixed part plus the steady step time, VAE work by images), summed to GPU-seconds per identity,
  against the paper's ~400 RTX-4090-seconds per identity and a 24 GiB card. Without bitsandbytes,
  paper.yaml's 8-bit Adam is measured as torch AdamW and its memory estimated;
- sampling, ours vs plain diffusers: the same prompts, seeds, steps and batches through our
  `DiversityInjectionGenerator.sample_latents` and through plain `StableDiffusionPipeline.__call__`
  (the same pipeline under the same autocast, and with UNet and text encoder weights in the half dtype);
- the Re-ID trainer step (BoT ResNet-50 via timm, 256x128, one PK batch) and the pre-training step
  (ResNet-50, 256x128, batch 512, Mixup/CutMix, Random Erasing): images/s and peak memory, fp32 vs
  mixed precision (bf16 autocast + channels_last, as `trainers.device.Precision` sets it).

It never imports Ray (the check fails if anything did). The modules it uses are Ray-free at import:
the stages, the run config (`core.settings.run`), `trainers.device` and the Re-ID model, loss and
schedule modules. The Ray Train loops (`trainers.reid.train`, `trainers.pretrain.train`) are not:
the two training steps here are those loops' bodies on one batch already on the device.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.metadata
import importlib.util
import inspect
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # identity_cost, run as a script or loaded by path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from trainers.device import Precision  # noqa: E402  (Ray-free: Ray is imported only inside train_worker_device)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PRESETS = ("configs/paper.yaml", "configs/paper-fast.yaml")
SECTIONS = ("caption", "generation", "sampling", "reid", "pretrain")
PAPER_4090_SECONDS_PER_IDENTITY = 400.0  # Diffusion-ReID: ~400 s per identity on one RTX 4090
CARD_24GB_BYTES = 24 * 2**30  # an RTX 4090's memory
FILTER_CLASSES = 751  # Market-1501's training identities: the filter model's classifier
PRETRAIN_CLASSES = 5183  # Diff-Person's identities (configs/paper.yaml)
# The packages the device machine lacks are carried as wheels (benchmarks/gpu_check_bundle.sh).
REQUIRED = {"diffusers": "diffusers", "pydantic": "pydantic", "yaml": "pyyaml", "transformers": "transformers",
            "timm": "timm", "peft": "peft", "pyarrow": "pyarrow", "PIL": "pillow"}
PACKAGES = ("torch", "diffusers", "transformers", "timm", "peft", "accelerate", "huggingface-hub", "pydantic",
            "pydantic-core", "typing-extensions", "bitsandbytes", "tokenizers", "safetensors", "pyarrow", "numpy")


# -- small utilities -------------------------------------------------------------------------
def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device: str) -> int | None:
    """The CUDA allocator's peak since the last `reset_peak` (None on a CPU)."""
    return int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None


def quiet_libraries() -> None:
    """diffusers' and transformers' warnings only as errors (e.g. each `.to(dtype)` of a model
    built from a config warns about modules to keep in fp32, and there are none)."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


def ray_modules() -> list[str]:
    return sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))


def missing_requirements() -> list[str]:
    """Distributions this check imports that are not importable here (carry them as wheels)."""
    return [dist for module, dist in REQUIRED.items() if importlib.util.find_spec(module) is None]


class Budget:
    """Wall-clock budget of the whole check: a step that would start after it is skipped."""

    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def exhausted(self) -> bool:
        return self.elapsed() > self.seconds


@dataclass
class Report:
    """Everything measured, as written to `--json` (after each section, so a run cut short keeps
    what it finished)."""

    path: Path | None
    data: dict[str, Any] = field(default_factory=dict)

    def section(self, name: str) -> dict[str, Any]:
        return self.data.setdefault(name, {})

    def status(self, name: str, value: str) -> None:
        self.data.setdefault("status", {})[name] = value

    def write(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")


def run_section(report: Report, name: str, budget: Budget, skip: Sequence[str], body: Callable[[], None]) -> None:
    """Run one section unless skipped or past the budget; a failure is recorded (traceback
    printed) and the check goes on with the next section."""
    if name in skip:
        report.status(name, "skipped (--skip)")
        return
    if budget.exhausted():
        report.status(name, f"skipped (budget of {budget.seconds:.0f} s spent)")
        print(f"\n== {name}: skipped, {budget.elapsed():.0f} s of the {budget.seconds:.0f} s budget spent", flush=True)
        return
    start = time.perf_counter()
    try:
        body()
    except Exception as err:  # one section's failure must not lose the others' figures
        traceback.print_exc()
        report.status(name, f"failed: {type(err).__name__}: {err}")
    else:
        report.status(name, "ok")
    report.section("section_seconds")[name] = time.perf_counter() - start
    report.write()


# -- environment -----------------------------------------------------------------------------
def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.cache
def eight_bit_adam(device: str) -> str | None:
    """None where bitsandbytes' AdamW8bit can run here, else why not."""
    if not device.startswith("cuda"):
        return "no CUDA device (bitsandbytes' 8-bit optimizers run on the GPU)"
    try:
        import bitsandbytes as bnb

        probe = torch.nn.Parameter(torch.zeros(4096, device=device))
        probe.grad = torch.ones_like(probe)
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
    except Exception as err:  # ImportError, or a library built for another CUDA
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def environment(device: str) -> dict[str, Any]:
    from core.device import driver_version

    env: dict[str, Any] = {
        "device": device, "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "packages": package_versions(),
        "pythonpath": os.environ.get("PYTHONPATH", ""),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name, gpu_memory_bytes=int(props.total_memory), multiprocessors=props.multi_processor_count,
            compute_capability=f"{props.major}.{props.minor}", driver=driver_version(),
            bf16_native=torch.cuda.is_bf16_supported(including_emulation=False),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
        )
    env["eight_bit_adam"] = eight_bit_adam(device) or "available"
    return env


def print_environment(env: dict[str, Any]) -> None:
    print("== environment")
    if env["device"].startswith("cuda"):
        print(f"GPU {env['gpu']} ({env['multiprocessors']} SMs, sm_{env['compute_capability'].replace('.', '')}), "
              f"{gib(env['gpu_memory_bytes'])}, driver {env['driver']}; bf16 native {env['bf16_native']}, "
              f"TF32 matmul {env['tf32_matmul']}, TF32 cuDNN {env['tf32_cudnn']}")
    else:
        print(f"CPU only ({env['cpu_count']} cores, {env['torch_threads']} torch threads)")
    print(f"python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), "
          f"8-bit Adam: {env['eight_bit_adam']}")
    print("packages: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v))


# -- presets ---------------------------------------------------------------------------------
def load_preset(path: Path, overrides: Sequence[str]) -> Any:
    """A preset through the project's own loader (`base:` inheritance, `--set` overrides,
    validation naming the key); Ray-free, so it runs on the bare GPU machine."""
    from core.settings.run import load_run_config

    return load_run_config(path, list(overrides))


def tiny_overrides() -> list[str]:
    """The tiny models' resolution (`demo.tiny`) and a short caption sequence."""
    from demo.tiny import TEXT_TO_IMAGE_RESOLUTION

    height, width = TEXT_TO_IMAGE_RESOLUTION
    return [f"generation.resolution=[{height}, {width}]", f"output.image_size=[{height}, {width}]",
            "sequences.max_images=4", "caption.max_new_tokens=8"]


def reduced_overrides(g: Any, tiny: bool) -> list[str]:
    """The counts measured: two sample batches of reference images and samples (one when tiny),
    10 sampling steps (2), 20 train steps (2); never more than the preset's own."""
    batches, steps, train = (1, 2, 2) if tiny else (2, 10, 20)
    reference_steps = g.reference_inference_steps or g.num_inference_steps
    values = {
        "reference_images": min(g.reference_images, batches * g.sample_batch_size),
        "reference_inference_steps": min(reference_steps, steps),
        "num_inference_steps": min(g.num_inference_steps, steps),
        "train_steps": min(g.train_steps, train),
        "samples_per_identity": min(g.samples_per_identity, batches * g.sample_batch_size),
    }
    return [f"generation.{key}={value}" for key, value in values.items()]


def counts(g: Any) -> dict[str, int]:
    return {"reference_images": g.reference_images,
            "reference_inference_steps": g.reference_inference_steps or g.num_inference_steps,
            "train_steps": g.train_steps, "samples_per_identity": g.samples_per_identity,
            "num_inference_steps": g.num_inference_steps}


def recipe(g: Any) -> dict[str, Any]:
    keys = ("resolution", "scheduler", "guidance_scale", "train_batch_size", "sample_batch_size", "vae_batch_size",
            "finetune", "reference_latents", "mixed_precision", "gradient_checkpointing", "use_8bit_adam",
            "prior_loss_weight")
    return {key: getattr(g, key) for key in keys}


@dataclass
class Preset:
    name: str
    full: Any  # the RunConfig at the preset's counts
    reduced: Any  # the same at the measured counts
    notes: list[str] = field(default_factory=list)


def load_presets(paths: Sequence[str], overrides: Sequence[str], tiny: bool, device: str) -> list[Preset]:
    presets = []
    base = (tiny_overrides() if tiny else []) + list(overrides)
    adam = eight_bit_adam(device)
    for name in paths:
        path = Path(name) if Path(name).is_absolute() else REPO_ROOT / name
        notes, extra = [], []
        full = load_preset(path, base)
        if full.generation.use_8bit_adam and adam is not None:
            extra.append("generation.use_8bit_adam=false")
            notes.append(f"use_8bit_adam: measured with torch AdamW, bitsandbytes' AdamW8bit cannot run here ({adam})")
        full = load_preset(path, base + extra)
        reduced = load_preset(path, base + extra + reduced_overrides(full.generation, tiny))
        presets.append(Preset(path.name, full, reduced, notes))
    return presets


# -- models ----------------------------------------------------------------------------------
def pipeline_loader(tiny: bool) -> Callable[[str, str], Any]:
    """`GenerationStage`'s loader: SD v1.4's architecture with random weights, built on the device
    (or the embedded default's tiny SD); the tokenizer is a small trained CLIP BPE either way."""
    from demo.tokenizers import train_clip_tokenizer

    tokenizer = train_clip_tokenizer()

    def load(model_id: str, device: str):
        torch.manual_seed(0)
        if tiny:
            from demo.tiny import tiny_stable_diffusion

            return tiny_stable_diffusion(seed=0, tokenizer=tokenizer).to(device)
        from full_size_models import random_stable_diffusion_v1_4

        with torch.device(device):  # initialised on the GPU: seconds instead of a minute on the CPU
            return random_stable_diffusion_v1_4(tokenizer).to(device)

    return load


def captioner(config: Any, device: str, tiny: bool) -> tuple[Any, Any]:
    """(model, processor): BLIP-2 OPT-2.7b's architecture with random weights in the caption dtype
    (`identity_cost._random_captioner`), or the tiny BLIP-2."""
    if not tiny:
        from identity_cost import _random_captioner

        torch.manual_seed(0)
        return _random_captioner(config, device)
    from demo.tiny import tiny_blip2
    from factory.models.loading import resolve_dtype

    model, processor = tiny_blip2(seed=0)
    return model.to(device, resolve_dtype(config.dtype, device)), processor


def release() -> None:
    from identity_cost import _release

    _release()


# -- caption ---------------------------------------------------------------------------------
def caption_rows(preset: Preset, meter: Any, device: str, tiny: bool, cache: dict[str, Any],
                 measure: bool) -> tuple[Any, dict[str, Any]]:
    """Caption a warm-up identity (row 0) and the measured one (row 1) with the preset's
    `CaptionStage`; returns both captioned rows and the measured identity's figures. Not
    `measure`: `captions: category` (no captioner; the prompts carry the category), for a check
    with the caption section skipped."""
    import pyarrow as pa
    from identity_cost import sequence_rows

    from factory.stages.caption import CaptionStage

    config = preset.reduced.caption
    if not measure:
        config = config.model_copy(update={"captions": "category"})
    stage = CaptionStage(config, 1.0 if device.startswith("cuda") else 0.0)
    figures: dict[str, Any] = {}
    if measure:
        key = json.dumps([config.model, config.dtype])
        if key not in cache:  # one captioner for every preset with the same model and dtype
            cache.clear()
            release()
            start = time.perf_counter()
            cache[key] = captioner(config, device, tiny)
            figures["setup_seconds"] = time.perf_counter() - start
        stage.device = device
        stage.model, stage.processor = cache[key]
    rows = sequence_rows(2, preset.reduced.sequences.max_images)
    warmup = stage.process_batch(rows.slice(0, 1))
    meter.begin("caption")
    measured = stage.process_batch(rows.slice(1, 1))
    stats = meter.take()["caption"]
    if measure:
        figures.update(seconds=measured.column("caption_seconds")[0].as_py(), peak_memory_bytes=stats.peak_memory_bytes,
                       images=preset.reduced.sequences.max_images, max_new_tokens=config.max_new_tokens,
                       dtype=str(stage.model.dtype), caption=measured.column("caption")[0].as_py(),
                       prompt=measured.column("prompt")[0].as_py())
    stage.model = stage.processor = None
    return pa.concat_tables([warmup, measured]), figures


# -- generation ------------------------------------------------------------------------------
def generation_stage(preset: Preset, device: str, tiny: bool, threads: int | None) -> Any:
    """The preset's `GenerationStage` (as its Ray actor holds it), set up on `device`."""
    from factory.stages.generate import GenerationStage

    g = preset.reduced.generation
    kwargs: dict[str, Any] = {"loader": pipeline_loader(tiny)}
    if "device" in inspect.signature(GenerationStage).parameters:
        kwargs["device"] = device
    stage = GenerationStage(g, preset.reduced.output, 1.0 if device.startswith("cuda") else 0.0, threads, **kwargs)
    stage.setup()
    if stage.generator.device != device:
        raise RuntimeError(f"GenerationStage set up on {stage.generator.device}, not {device}")
    return stage


def meter_restore(generator: Any, meter: Any) -> None:
    """Meter the restore of the base weights after each identity as a span (`.../restore`)."""
    restore = generator.restore_base_weights

    def metered() -> None:
        with meter.span("restore", 0):
            restore()

    generator.restore_base_weights = metered


class StepClock:
    """The start of every training forward of the UNet (one per fine-tune step), after a CUDA
    sync, so that consecutive starts are a whole step apart (forward, backward, optimizer step).
    The fine-tune loop itself no longer syncs per step: this clock adds one sync per step, which
    costs the queue's overlap at one step boundary (kernel launch latency, well under a millisecond
    against a step of ~100 ms at 512x512)."""

    def __init__(self, unet: torch.nn.Module, device: str) -> None:
        self.device, self.starts = device, []
        self.handle = unet.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            sync(self.device)
            self.starts.append(time.perf_counter())

    def step_seconds(self) -> float | None:
        """A steady step's seconds: the median interval between starts, the first step's (which
        allocates the optimizer state) left out where there are more."""
        intervals = [b - a for a, b in zip(self.starts, self.starts[1:])]
        intervals = intervals[1:] or intervals
        return sorted(intervals)[len(intervals) // 2] if intervals else None


def full_vae_images(g: Any, instance_images: int) -> dict[str, int]:
    """Images through the VAE per identity at `g`'s counts, per span of identity_cost's meter."""
    from factory.stages.reference_set import REFERENCE_PREVIEWS

    prior = g.prior_loss_weight > 0 and g.reference_images > 0 and g.train_steps > 0
    reencoded = g.reference_images if prior and g.reference_latents == "reencoded" else 0
    return {"reference_set/vae_decode": min(REFERENCE_PREVIEWS, g.reference_images),
            "fine_tune/vae_encode": (instance_images if g.train_steps > 0 else 0) + reencoded,
            "fine_tune/vae_decode": reencoded,
            "sample/vae_decode": g.samples_per_identity}


def measure_identity(stage: Any, rows: Any, meter: Any, clock: StepClock) -> dict[str, Any]:
    """Run the warm-up identity (row 0), then the measured one (row 1); the measured identity's
    phase timings (the stage's own), meter figures, VAE / restore spans and fine-tune step time."""
    from identity_cost import GENERATION_PHASES

    for number in range(2):
        meter.spans.clear()
        clock.starts.clear()
        start = time.perf_counter()
        out = stage.process_batch(rows.slice(number, 1))
        meter.end()
        wall = time.perf_counter() - start
        result = out.to_pylist()[0]
        if result["status"] != "ok":
            raise RuntimeError(f"identity {result['identity']} failed: {result['error']}")
        stats = meter.take()
    timings = dict(result["timings"])
    spans = {key: asdict(value) for key, value in meter.spans.items()}
    restore = sum(s["wall_seconds"] for k, s in spans.items() if k.endswith("/restore"))
    return {
        "wall_seconds": wall, "timings": timings, "spans": spans, "restore_seconds": restore,
        "other_seconds": wall - sum(timings.get(p, 0.0) for p in GENERATION_PHASES) - restore,
        "phases": {p: asdict(stats[p]) for p in GENERATION_PHASES if p in stats},
        "sample_prompts": result["sample_prompts"], "sample_seeds": result["sample_seeds"],
        "instance_images": len(result["image_bytes"]), "train_steps_timed": len(clock.starts),
        "train_step_seconds": clock.step_seconds(),
    }


def extrapolate(measured: dict[str, Any], caption: dict[str, Any] | None, full_g: Any, reduced_g: Any,
                pipe: Any) -> dict[str, dict[str, Any]]:
    """Per phase: measured seconds and peak memory, and the seconds at the full counts. Linear:
    the sampling phases' UNet work (time outside their VAE spans) by the recipe's UNet
    forward-equivalents; the fine-tune's as a fixed part plus the steady step time per train step;
    VAE spans by images; the rest of an identity (decoding inputs, encoding outputs) by the
    samples, the restore of the base weights as measured."""
    from identity_cost import expected_unet_work

    full_work, reduced_work = expected_unet_work(full_g, pipe), expected_unet_work(reduced_g, pipe)
    full_images = full_vae_images(full_g, measured["instance_images"])
    spans = measured["spans"]
    rows: dict[str, dict[str, Any]] = {}
    if caption is not None:
        rows["caption"] = {"seconds": caption["seconds"], "full_seconds": caption["seconds"],
                           "peak_memory_bytes": caption["peak_memory_bytes"]}

    def vae(phase: str) -> tuple[float, float]:
        """(measured, full) seconds of the phase's VAE spans."""
        got = full = 0.0
        for key, span in spans.items():
            if key.startswith(phase + "/vae_") and span["images"]:
                got += span["wall_seconds"]
                full += span["wall_seconds"] / span["images"] * full_images.get(key, span["images"])
        return got, full

    for phase in ("reference_set", "fine_tune", "sample"):
        seconds = measured["timings"].get(phase, 0.0)
        vae_seconds, vae_full = vae(phase)
        if phase == "sample":  # the samples' decode is its own row
            vae_seconds, vae_full = 0.0, 0.0
            decode = spans.get("sample/vae_decode")
            unet_seconds = seconds - (decode["wall_seconds"] if decode else 0.0)
        else:
            unet_seconds = seconds - vae_seconds
        ratio = full_work[phase][1] / reduced_work[phase][1] if reduced_work[phase][1] else 0.0
        stats = measured["phases"].get(phase, {})
        row = {"seconds": unet_seconds + vae_seconds, "full_seconds": unet_seconds * ratio + vae_full,
               "peak_memory_bytes": stats.get("peak_memory_bytes"),
               "unet_forward_equivalents": stats.get("unet_forward_equivalents"),
               "full_unet_forward_equivalents": full_work[phase][1], "unet_ratio": ratio}
        step = measured.get("train_step_seconds")
        if phase == "fine_tune" and step is not None and measured["train_steps_timed"] == reduced_g.train_steps:
            fixed = max(0.0, unet_seconds - reduced_g.train_steps * step)  # prompts, adapter, optimizer, ...
            row.update(step_seconds=step, fixed_seconds=fixed,
                       full_seconds=fixed + full_g.train_steps * step + vae_full)
        rows[phase] = row
    decode = spans.get("sample/vae_decode")
    if decode:
        rows["vae_decode"] = {"seconds": decode["wall_seconds"], "images": decode["images"],
                              "full_seconds": decode["wall_seconds"] / decode["images"] * full_g.samples_per_identity,
                              "peak_memory_bytes": decode["peak_memory_bytes"],
                              "peak_above_start_bytes": decode["peak_increase_bytes"]}
    samples = full_g.samples_per_identity / max(1, reduced_g.samples_per_identity)
    rows["other"] = {"seconds": measured["other_seconds"] + measured["restore_seconds"],
                     "full_seconds": measured["other_seconds"] * samples + measured["restore_seconds"],
                     "peak_memory_bytes": None}
    return rows


def unet_work_check(measured: dict[str, Any], reduced_g: Any, pipe: Any) -> dict[str, str]:
    """The UNet work counted in each phase against the recipe's formula (identity_cost's check)."""
    from identity_cost import expected_unet_work

    checks = {}
    for phase, (calls, fwd) in expected_unet_work(reduced_g, pipe).items():
        stats = measured["phases"].get(phase, {})
        got = (stats.get("unet_calls"), stats.get("unet_forward_equivalents"))
        checks[phase] = "ok" if got == (calls, fwd) else f"MISMATCH: counted {got}, formula ({calls}, {fwd})"
    return checks


def identity_summary(preset: Preset, rows: dict[str, dict[str, Any]], unet_parameters: int) -> dict[str, Any]:
    """GPU-seconds per identity at the full counts, against the paper's 400 RTX-4090-seconds,
    and the peak memory against a 24 GiB card."""
    total = sum(r["full_seconds"] for r in rows.values())
    peaks = [r["peak_memory_bytes"] for r in rows.values() if r.get("peak_memory_bytes") is not None]
    peak = max(peaks) if peaks else None
    notes = list(preset.notes)
    fine_tune_8bit = None
    full_finetune = preset.full.generation.finetune == "full"
    if full_finetune and any(n.startswith("use_8bit_adam") for n in notes) and rows.get("fine_tune", {}).get(
            "peak_memory_bytes"):
        # AdamW keeps two fp32 moments (8 bytes a parameter); AdamW8bit two 8-bit ones (2 bytes)
        fine_tune_8bit = rows["fine_tune"]["peak_memory_bytes"] - 6 * unet_parameters
        notes.append(f"fine_tune peak with AdamW8bit estimated at {gib(fine_tune_8bit)} (6 bytes less per trained "
                     f"parameter: {unet_parameters / 1e6:.0f}M UNet parameters)")
    return {"gpu_seconds_per_identity": total, "paper_4090_seconds_per_identity": PAPER_4090_SECONDS_PER_IDENTITY,
            "vs_paper": total / PAPER_4090_SECONDS_PER_IDENTITY, "peak_memory_bytes": peak,
            "fits_24gb": None if peak is None else peak <= CARD_24GB_BYTES, "fine_tune_peak_8bit_adam_estimate":
            fine_tune_8bit, "unet_parameters": unet_parameters, "phases": rows, "notes": notes}


def print_identity(preset: Preset, generation: dict[str, Any], summary: dict[str, Any], memory: str) -> None:
    g, r = preset.full.generation, preset.reduced.generation
    prior = f" (+{g.train_batch_size} prior)" if g.prior_loss_weight > 0 and g.reference_images > 0 else ""
    print(f"\n== one identity, {preset.name}: {g.resolution[0]}x{g.resolution[1]}, {generation['scheduler']}, "
          f"finetune {g.finetune} ({generation['optimizer']}), {g.mixed_precision}, gradient checkpointing "
          f"{'on' if g.gradient_checkpointing else 'off'}, sample batch {g.sample_batch_size}, vae batch {g.vae_batch_size}, "
          f"reference latents {g.reference_latents}")
    full, got = counts(g), counts(r)
    print(f"counts measured -> full: reference set {got['reference_images']} x {got['reference_inference_steps']} steps -> "
          f"{full['reference_images']} x {full['reference_inference_steps']}; train {got['train_steps']} -> "
          f"{full['train_steps']} steps x batch {g.train_batch_size}{prior}; samples {got['samples_per_identity']} x "
          f"{got['num_inference_steps']} steps -> {full['samples_per_identity']} x {full['num_inference_steps']}")
    print(f"  {'phase':<15}{'measured s':>11}{memory:>13}{'UNet fwd-eq':>13}{'-> full':>9}{'full s':>10}")
    for phase, row in summary["phases"].items():
        fwd, ratio = row.get("unet_forward_equivalents"), row.get("unet_ratio")
        scale = "per step" if "step_seconds" in row else "-" if ratio is None else f"x{ratio:.0f}"
        print(f"  {phase:<15}{row['seconds']:>11.3f}{gib(row.get('peak_memory_bytes')):>13}"
              f"{'-' if fwd is None else fwd:>13}{scale:>9}{row['full_seconds']:>10.1f}")
    fits = summary["fits_24gb"]
    print(f"  {'total':<15}{'':>11}{gib(summary['peak_memory_bytes']):>13}{'':>22}{summary['gpu_seconds_per_identity']:>10.1f}"
          f"   = {summary['vs_paper']:.2f} x the paper's {PAPER_4090_SECONDS_PER_IDENTITY:.0f} RTX-4090-s/identity; "
          f"peak {'within' if fits else 'over' if fits is not None else 'vs'} 24 GiB")
    print(f"  setup {generation['setup_seconds']:.1f} s (not in the figures); base weights: {generation['base_weights']}; "
          f"UNet work vs formula: " + ", ".join(f"{k} {v}" for k, v in generation["unet_work_check"].items()))
    fine_tune = summary["phases"].get("fine_tune", {})
    if "step_seconds" in fine_tune:
        print(f"  fine_tune at full counts: {fine_tune['fixed_seconds']:.2f} s fixed + {g.train_steps} steps x "
              f"{1000 * fine_tune['step_seconds']:.1f} ms (steady step) + VAE work by images")
    for note in summary["notes"]:
        print(f"  note: {note}")


# -- sampling: ours vs plain diffusers -------------------------------------------------------
def autocast_for(device: str, mixed_precision: str) -> Callable[[], AbstractContextManager[Any]]:
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return (lambda: nullcontext()) if dtype is None else (lambda: torch.autocast(kind, dtype=dtype))


def plain_diffusers_latents(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int, g: Any,
                            autocast: Callable[[], AbstractContextManager[Any]]) -> torch.Tensor:
    """The sampling as plain diffusers code writes it: one `pipe(...)` per batch of
    `sample_batch_size` prompts, one CPU generator per image, latents out."""
    chunks = []
    for start in range(0, len(prompts), g.sample_batch_size):
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start : start + g.sample_batch_size]]
        with autocast():
            result = pipe(prompt=list(prompts[start : start + g.sample_batch_size]), height=g.resolution[0],
                          width=g.resolution[1], num_inference_steps=steps, guidance_scale=g.guidance_scale,
                          generator=generators, output_type="latent")
        chunks.append(result.images)
    return torch.cat(chunks)


def half_weights_pipeline(pipe: Any, dtype: torch.dtype) -> Any:
    """The same pipeline with copies of its UNet and text encoder in `dtype`, what
    `from_pretrained(torch_dtype=...)` gives a plain script (latents then in `dtype` too); the
    VAE (unused: latents out) and the scheduler are shared."""
    from diffusers import StableDiffusionPipeline

    unet = copy.deepcopy(pipe.unet).to(dtype)
    unet._forward_pre_hooks.clear()  # the copied counting hook: the caller registers its own
    half = StableDiffusionPipeline(vae=pipe.vae, text_encoder=copy.deepcopy(pipe.text_encoder).to(dtype),
                                   tokenizer=pipe.tokenizer, unet=unet, scheduler=pipe.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    half.set_progress_bar_config(disable=True)
    return half


def compare_sampling(generator: Any, g: Any, measured: dict[str, Any], meter: Any, device: str,
                     repeats: int) -> dict[str, Any]:
    """The measured identity's sample prompts and seeds at the measured steps, sampled by ours and
    by plain pipeline calls; the best of `repeats` runs each, alternating."""
    from identity_cost import count_unet

    prompts, seeds = measured["sample_prompts"], measured["sample_seeds"]
    steps, pipe = g.num_inference_steps, generator.pipe
    autocast = autocast_for(device, g.mixed_precision)
    variants: dict[str, Callable[[], torch.Tensor]] = {
        "ours": lambda: generator.sample_latents(prompts, seeds, steps),
        "plain": lambda: plain_diffusers_latents(pipe, prompts, seeds, steps, g, autocast),
    }
    half_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(g.mixed_precision)
    handles = []
    if half_dtype is not None:
        half = half_weights_pipeline(pipe, half_dtype)
        handles.append(count_unet(half.unet, meter, recompute=False))
        variants["plain_half_weights"] = lambda: plain_diffusers_latents(half, prompts, seeds, steps, g, nullcontext)
    results: dict[str, dict[str, Any]] = {name: {"seconds": float("inf")} for name in variants}
    latents: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        for name, run in variants.items():
            meter.begin(f"sampling/{name}")
            out = run()
            stats = meter.take()[f"sampling/{name}"]
            latents[name] = out.float().cpu()
            if stats.wall_seconds < results[name]["seconds"]:
                results[name] = {"seconds": stats.wall_seconds, "peak_memory_bytes": stats.peak_memory_bytes,
                                 "unet_calls": stats.unet_calls}
    for handle in handles:
        handle.remove()
    ours = results["ours"]["seconds"]
    for name, row in results.items():
        row["ours_over_this"] = ours / row["seconds"]
        row["max_abs_latent_diff_vs_ours"] = float((latents[name] - latents["ours"]).abs().max())
    return {"images": len(prompts), "steps": steps, "batch": g.sample_batch_size, "repeats": repeats,
            "scheduler": type(pipe.scheduler).__name__, "variants": results}


def print_sampling(name: str, sampling: dict[str, Any], memory: str) -> None:
    print(f"\n== sampling, ours vs plain diffusers ({name}: {sampling['images']} images x {sampling['steps']} steps, "
          f"batch {sampling['batch']}, {sampling['scheduler']}, best of {sampling['repeats']})")
    labels = {"ours": "ours: DiversityInjectionGenerator.sample_latents", "plain": "plain pipe(), same pipeline + autocast",
              "plain_half_weights": "plain pipe(), UNet + text encoder in half dtype"}
    print(f"  {'variant':<50}{'seconds':>9}{memory:>13}{'UNet calls':>11}{'ours/this':>10}{'max|diff|':>11}")
    for key, row in sampling["variants"].items():
        print(f"  {labels[key]:<50}{row['seconds']:>9.3f}{gib(row['peak_memory_bytes']):>13}{row['unet_calls']:>11}"
              f"{row['ours_over_this']:>10.3f}{row['max_abs_latent_diff_vs_ours']:>11.3g}")


def run_generation(preset: Preset, rows: Any, caption: dict[str, Any] | None, report: Report, meter: Any,
                   device: str, tiny: bool, threads: int | None, do_identity: bool, do_sampling: bool) -> None:
    """Set up the preset's generation stage, measure one identity (and the sampling comparison)."""
    from identity_cost import count_unet, meter_vae

    memory = "peak alloc" if device.startswith("cuda") else "peak RSS"
    start = time.perf_counter()
    stage = generation_stage(preset, device, tiny, threads)
    setup = time.perf_counter() - start
    generator, g = stage.generator, preset.reduced.generation
    handle = count_unet(generator.unet, meter, recompute=g.gradient_checkpointing)
    generator.phase_listeners.append(meter.begin)
    meter_vae(generator, meter)
    meter_restore(generator, meter)
    clock = StepClock(generator.unet, device)
    try:
        measured = measure_identity(stage, rows, meter, clock)
        clock.handle.remove()
        if do_identity:
            base = getattr(getattr(generator, "finetune_method", None), "base_copy", None)  # LoRA keeps none
            optimizer = "AdamW8bit" if g.use_8bit_adam else "torch AdamW"
            generation = {
                "setup_seconds": setup, "scheduler": type(generator.pipe.scheduler).__name__, "optimizer": optimizer,
                "base_weights": base.where if base is not None else "none kept (LoRA)",
                "recipe": recipe(preset.full.generation), "full_counts": counts(preset.full.generation),
                "measured_counts": counts(g), "unet_work_check": unet_work_check(measured, g, generator.pipe),
                **{k: v for k, v in measured.items() if k not in ("sample_prompts", "sample_seeds")},
            }
            rows_ = extrapolate(measured, caption, preset.full.generation, g, generator.pipe)
            summary = identity_summary(preset, rows_, sum(p.numel() for p in generator.unet.parameters()))
            report.section("generation")[preset.name] = generation
            report.section("identity")[preset.name] = summary
            print_identity(preset, generation, summary, memory)
            report.write()
        if do_sampling:
            sampling = compare_sampling(generator, g, measured, meter, device, repeats=1 if tiny else 2)
            report.section("sampling")[preset.name] = sampling
            print_sampling(preset.name, sampling, memory)
            report.write()
    finally:
        handle.remove()
        clock.handle.remove()
        stage.generator = None
        del generator, stage
        release()


# -- training steps --------------------------------------------------------------------------
def time_steps(step: Callable[[], None], warmup: int, steps: int, device: str) -> tuple[float, int | None]:
    """(seconds of `steps` steps after `warmup` ones, peak memory over all)."""
    reset_peak(device)
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - start, peak_bytes(device)


def reid_step_figures(config: Any, device: str, mixed: bool, warmup: int, steps: int) -> dict[str, Any]:
    """The BoT trainer's step (`trainers.reid.train.train_one_epoch`'s loop body) on one PK batch
    already on the device: forward under the precision's autocast, BotLoss, backward, Adam step."""
    from trainers.reid.losses import BotLoss
    from trainers.reid.model import build_reid_model
    from trainers.reid.schedule import build_optimizer

    precision = Precision.for_device(device, mixed)
    torch.manual_seed(0)
    model = build_reid_model(config, FILTER_CLASSES, init="random").to(device, memory_format=precision.memory_format)
    optimizer, loss_fn = build_optimizer(model, config), BotLoss(config.label_smoothing, config.triplet_margin)
    batch = config.ids_per_batch * config.images_per_id
    images = torch.randn(batch, 3, *config.image_size, device=device)
    labels = torch.arange(config.ids_per_batch, device=device).repeat_interleave(config.images_per_id)
    model.train()

    def step() -> None:
        inputs = images.to(device, memory_format=precision.memory_format)
        with precision.autocast():
            losses = loss_fn(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(losses["loss"])
        precision.step(optimizer)

    seconds, peak = time_steps(step, warmup, steps, device)
    return {"precision": precision.label, "batch": batch, "steps": steps, "seconds": seconds,
            "images_per_second": steps * batch / seconds, "step_ms": 1000 * seconds / steps, "peak_memory_bytes": peak}


def pretrain_step_figures(config: Any, device: str, mixed: bool, warmup: int, steps: int) -> dict[str, Any]:
    """The pre-training step (`trainers.pretrain.train.train_one_epoch`'s loop body) on one
    synthetic uint8 batch on the device: augment, forward, soft-target CE, backward, timm AdamW,
    in `plan_batches` micro-batches."""
    from core.settings.pretrain import plan_batches
    from trainers.pretrain.recipe import BatchAugment, build_loss, build_model, build_optimizer

    precision = Precision.for_device(device, mixed)
    torch.manual_seed(0)
    model = build_model(config, PRETRAIN_CLASSES).to(device, memory_format=precision.memory_format)
    optimizer, loss_fn = build_optimizer(model, config), build_loss(config)
    augment = BatchAugment(config, PRETRAIN_CLASSES, torch.device(device), channels_last=precision.channels_last)
    plan = plan_batches(config.batch_size, 1, config.max_batch_per_step, even=config.mixup_enabled)
    images = torch.randint(0, 256, (config.batch_size, 3, *config.image_size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, PRETRAIN_CLASSES, (config.batch_size,), device=device)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        parts = list(zip(images.split(plan.micro_batch), labels.split(plan.micro_batch)))
        for micro_images, micro_labels in parts:
            inputs, targets = augment(micro_images, micro_labels)
            with precision.autocast():
                loss = loss_fn(model(inputs), targets)
            precision.backward(loss / len(parts))
        precision.step(optimizer)

    seconds, peak = time_steps(step, warmup, steps, device)
    return {"precision": precision.label, "batch": config.batch_size, "micro_batch": plan.micro_batch, "steps": steps,
            "seconds": seconds, "images_per_second": steps * config.batch_size / seconds,
            "step_ms": 1000 * seconds / steps, "peak_memory_bytes": peak}


def compare_precisions(measure: Callable[[bool], dict[str, Any]]) -> dict[str, Any]:
    fp32 = measure(False)
    release()
    mixed = measure(True)
    release()
    return {"fp32": fp32, "mixed": mixed, "speedup": mixed["images_per_second"] / fp32["images_per_second"]}


def print_steps(title: str, figures: dict[str, Any], memory: str) -> None:
    print(f"\n== {title}")
    print(f"  {'precision':<34}{'images/s':>10}{'step ms':>10}{memory:>13}")
    for key in ("fp32", "mixed"):
        row = figures[key]
        print(f"  {row['precision']:<34}{row['images_per_second']:>10.1f}{row['step_ms']:>10.1f}"
              f"{gib(row['peak_memory_bytes']):>13}")
    print(f"  mixed / fp32: x{figures['speedup']:.2f}")


def print_summary(data: dict[str, Any]) -> None:
    """The figures to quote, one line each."""
    device = data["environment"].get("gpu", "CPU")
    print(f"\n== summary ({device}{', --tiny' if data['tiny'] else ''})")
    for name, identity in data.get("identity", {}).items():
        fits = identity["fits_24gb"]
        print(f"  {name:<18} {identity['gpu_seconds_per_identity']:8.1f} GPU-s/identity at full counts "
              f"({identity['vs_paper']:.2f} x the paper's 400 RTX-4090-s), peak {gib(identity['peak_memory_bytes'])}"
              f"{'' if fits is None else ' (within 24 GiB)' if fits else ' (OVER 24 GiB)'}")
    for name, sampling in data.get("sampling", {}).items():
        plain = sampling["variants"]["plain"]
        print(f"  {name:<18} sampling: plain diffusers / ours = {plain['ours_over_this'] ** -1:.3f} in time")
    for key, title in (("reid_step", "Re-ID step"), ("pretrain_step", "pre-training step")):
        if key in data:
            steps = data[key]
            print(f"  {title:<18} {steps['fp32']['images_per_second']:8.1f} images/s fp32, "
                  f"{steps['mixed']['images_per_second']:.1f} mixed (x{steps['speedup']:.2f})")


# -- main ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="the same code path on the CPU with the tiny models, tiny counts and tiny training steps")
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this file")
    parser.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS), metavar="YAML",
                        help="presets measured, one identity each (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="config override applied to every preset before the counts are reduced")
    parser.add_argument("--skip", nargs="+", default=[], choices=SECTIONS, metavar="SECTION",
                        help=f"sections left out, of {', '.join(SECTIONS)}")
    parser.add_argument("--budget-seconds", type=float, default=330.0,
                        help="a section or preset that would start after this many seconds is skipped (default: 330)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cpu with --tiny, else cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 with --tiny, else torch's)")
    return parser


def run_presets(args: argparse.Namespace, presets: Sequence[Preset], report: Report, budget: Budget,
                device: str, threads: int | None) -> None:
    """Caption (all presets, one captioner), then each preset's generation and sampling."""
    from identity_cost import PhaseMeter

    meter = PhaseMeter(device)
    try:
        rows: dict[str, Any] = {}
        captions: dict[str, Any] = {}

        def caption() -> None:
            cache: dict[str, Any] = {}
            memory = "peak alloc" if device.startswith("cuda") else "peak RSS"
            print(f"\n== caption (BLIP-2 {'tiny' if args.tiny else 'OPT-2.7b, random weights'}; one identity's "
                  f"sequence after a warm-up identity)")
            print(f"  {'preset':<18}{'images':>7}{'tokens':>7}{'seconds':>9}{memory:>13}{'setup s':>9}  dtype")
            for preset in presets:
                rows[preset.name], captions[preset.name] = caption_rows(preset, meter, device, args.tiny, cache, True)
                c = captions[preset.name]
                report.section("caption")[preset.name] = c
                print(f"  {preset.name:<18}{c['images']:>7}{c['max_new_tokens']:>7}{c['seconds']:>9.3f}"
                      f"{gib(c['peak_memory_bytes']):>13}{c.get('setup_seconds', 0.0):>9.1f}  {c['dtype']}")
            cache.clear()
            release()

        run_section(report, "caption", budget, args.skip, caption)
        do_identity, do_sampling = "generation" not in args.skip, "sampling" not in args.skip

        def generation(preset: Preset) -> None:
            if preset.name not in rows:  # caption skipped or failed: category prompts, no captioner
                rows[preset.name], _ = caption_rows(preset, meter, device, args.tiny, {}, False)
            run_generation(preset, rows[preset.name], captions.get(preset.name), report, meter, device, args.tiny,
                           threads, do_identity, do_sampling)

        for preset in presets:
            name = f"generation:{preset.name}"
            skip = [name] if not (do_identity or do_sampling) else []  # both skipped: no pipeline to load
            run_section(report, name, budget, skip, lambda preset=preset: generation(preset))
    finally:
        meter.close()


def run_steps(args: argparse.Namespace, presets: Sequence[Preset], report: Report, budget: Budget, device: str) -> None:
    memory = "peak alloc" if device.startswith("cuda") else "peak RSS"
    warmup, steps = (1, 2) if args.tiny else (3, 20)
    reid = presets[0].full.filter.reid
    pretrain = presets[0].full.pretrain
    if args.tiny:
        reid = reid.model_copy(update={"arch": "resnet18", "image_size": (64, 32), "ids_per_batch": 4, "images_per_id": 2})
        pretrain = pretrain.model_copy(update={"arch": "resnet18", "image_size": (64, 32), "batch_size": 16})

    def reid_section() -> None:
        figures = compare_precisions(lambda mixed: reid_step_figures(reid, device, mixed, warmup, steps))
        figures["config"] = {"arch": reid.arch, "image_size": reid.image_size, "ids_per_batch": reid.ids_per_batch,
                             "images_per_id": reid.images_per_id, "classes": FILTER_CLASSES}
        report.section("reid_step").update(figures)
        print_steps(f"Re-ID trainer step (BoT {reid.arch}, {reid.image_size[0]}x{reid.image_size[1]}, batch "
                    f"{reid.ids_per_batch} ids x {reid.images_per_id}, Adam; batch on the device)", figures, memory)

    def pretrain_section() -> None:
        figures = compare_precisions(lambda mixed: pretrain_step_figures(
            pretrain, device, mixed, warmup, max(2, steps // 2)))
        figures["config"] = {"arch": pretrain.arch, "image_size": pretrain.image_size, "batch_size": pretrain.batch_size,
                             "classes": PRETRAIN_CLASSES, "mixup": pretrain.mixup_enabled}
        report.section("pretrain_step").update(figures)
        print_steps(f"pre-training step ({pretrain.arch}, {pretrain.image_size[0]}x{pretrain.image_size[1]}, batch "
                    f"{pretrain.batch_size}, Mixup/CutMix, Random Erasing, AdamW; batch on the device)", figures, memory)

    run_section(report, "reid", budget, args.skip, reid_section)
    run_section(report, "pretrain", budget, args.skip, pretrain_section)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device or ("cpu" if args.tiny else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; use --tiny (CPU, tiny models) or run it on a GPU machine", file=sys.stderr)
        return 2
    missing = missing_requirements()
    if missing:
        print(f"error: not importable here: {', '.join(missing)}; carry them as wheels "
              "(bash benchmarks/gpu_check_bundle.sh prints the command)", file=sys.stderr)
        return 2
    quiet_libraries()
    threads = args.threads or (1 if args.tiny else None)
    if threads:
        torch.set_num_threads(threads)
    budget = Budget(args.budget_seconds)
    report = Report(args.json, {"tiny": args.tiny, "argv": list(sys.argv[1:] if argv is None else argv),
                                "budget_seconds": args.budget_seconds})
    env = environment(device)
    report.data["environment"] = env
    print_environment(env)
    presets = load_presets(args.presets, args.overrides, args.tiny, device)
    report.data["presets"] = {p.name: {"recipe": recipe(p.full.generation), "full_counts": counts(p.full.generation),
                                       "measured_counts": counts(p.reduced.generation), "notes": p.notes}
                              for p in presets}
    report.write()
    run_presets(args, presets, report, budget, device, threads)
    run_steps(args, presets, report, budget, device)
    env["ray_imported"] = ray_modules()[:5]
    report.data["wall_seconds"] = budget.elapsed()
    report.write()
    print_summary(report.data)
    failed = {k: v for k, v in report.data.get("status", {}).items() if v.startswith("failed")}
    print(f"\nchecked in {budget.elapsed():.1f} s; sections: "
          + ", ".join(f"{k} {v}" for k, v in report.data.get("status", {}).items()))
    if env["ray_imported"]:
        print(f"error: Ray was imported ({', '.join(env['ray_imported'])}); the GPU machine has no Ray", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
