"""Cost of one identity, phase by phase: captioning, the Attribute Reference Set, the fine-tune,
the samples and the filter, as seconds, UNet work and peak memory.

    uv run python benchmarks/identity_cost.py                        # demo preset, demo models, CPU
    uv run python benchmarks/identity_cost.py --config configs/paper.yaml --tiny --identities 1
        # the paper's counts (200 references, 1000 steps, 150 samples x 50 steps ...) with the
        # embedded default's tiny models at the demo's resolution: runs on a laptop CPU
    uv run python benchmarks/identity_cost.py --random-init --device cuda --identities 2 --baseline
        # the real SD v1.4 / BLIP-2 OPT-2.7b architectures with random weights (the compute and
        # memory of the hub checkpoints), paper recipe

What it measures, per phase and per identity:

- seconds: the stages' own timings (what a build records in its manifest);
- UNet work, counted by a forward pre-hook on the pipeline's UNet: `unet_calls` (forward
  invocations) and `unet_forward_equivalents` (images through the UNet: the batch of every
  forward, doubled by classifier-free guidance since the pipeline concatenates the two halves;
  a training forward counts 3 - forward plus a backward of twice its cost - and 4 with
  `generation.gradient_checkpointing`, which recomputes the forward during the backward);
- peak memory: `torch.cuda.max_memory_allocated`, reset as each phase starts, on a GPU; the
  process's peak RSS during the phase (sampled every 10 ms) on the CPU;
- the VAE's work inside each phase (`PHASE/vae_encode`, `PHASE/vae_decode`): calls, images,
  seconds, peak memory and its rise over the memory in use as the call began (what the VAE's
  own activations cost, `generation.vae_batch_size` images at a time).

`--identities N` measures N identities after one warm-up identity (not in the figures): N + 1
identities run. The stages run as inside the Ray actors (one `setup`, then identities), without
Ray, one stage after the other (caption all, generate all, filter all) so that on a GPU each
stage's models are alone in memory, as on its own actor. Reference sets are sampled for every
identity (no reuse across identities), which is the cost of an identity with a new reference
prompt. A failed identity fails the benchmark (exit 1, its error printed).

`--baseline` does the same generation work with plain diffusers code in the same run, same
models, sizes, steps and batches: `StableDiffusionPipeline.__call__` for the reference set
(`output_type="latent"`, the set stays latents as in our plan) and for the samples
(`output_type="pil"`), and a prior-preservation fine-tune written as diffusers' DreamBooth example
(VAE-encoded instance images, DDPM noise, one UNet forward on the concatenated instance + prior
batch, MSE + lambda * prior MSE, clipped AdamW step), with the instance images encoded once
(the example re-encodes them every step; our plan encodes them once). Base weights are restored
after it. Ours / baseline per phase says what our loop adds over plain diffusers.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from core.shards import encode_image  # noqa: E402
from core.settings.run import DEFAULT_PRESET, REPO_ROOT, RunConfig, load_run_config  # noqa: E402
from factory.schema import SEQUENCE_SCHEMA  # noqa: E402

PHASES = ("caption", "reference_set", "fine_tune", "sample", "filter")
GENERATION_PHASES = ("reference_set", "fine_tune", "sample")
SOURCE = "bench"  # identities are bench/0 (warm-up), bench/1 ... bench/N


# -- measuring -------------------------------------------------------------------------------
@dataclass
class PhaseStats:
    wall_seconds: float = 0.0
    peak_memory_bytes: int = 0
    unet_calls: int = 0
    unet_forward_equivalents: int = 0


@dataclass
class SpanStats:
    """A region inside a phase (the VAE's encode or decode calls): how often it ran, its time,
    its peak memory and that peak above the memory in use as the region began."""

    calls: int = 0
    images: int = 0
    wall_seconds: float = 0.0
    peak_memory_bytes: int = 0
    peak_increase_bytes: int = 0


class PhaseMeter:
    """Wall time, peak memory and UNet work of the phase running now (`begin` ... `end`), and of
    regions inside it (`with span(...)`, keyed "PHASE/LABEL").

    Peak memory: on CUDA the allocator's peak, reset as a phase or span begins (the peak so far
    kept by the regions already open); on the CPU the process's RSS, sampled every `interval`
    seconds by a background thread, max over the phase or span."""

    def __init__(self, device: str, interval: float = 0.01) -> None:
        self.cuda = device.startswith("cuda")
        self.current: str | None = None
        self.stats: dict[str, PhaseStats] = {}
        self.spans: dict[str, SpanStats] = {}
        self._lock = threading.Lock()
        # The regions open now, "phase" and "span": [start time, memory at start, peak so far].
        self._open: dict[str, list] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not self.cuda:
            import psutil

            self._process = psutil.Process()
            self._thread = threading.Thread(target=self._sample_rss, args=(interval,), daemon=True)
            self._thread.start()

    def _rss(self) -> int:
        return int(self._process.memory_info().rss)

    def _sample_rss(self, interval: float) -> None:
        while not self._stop.wait(interval):
            rss = self._rss()
            with self._lock:
                for region in self._open.values():
                    region[2] = max(region[2], rss)

    def _open_region(self, kind: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        now = torch.cuda.memory_allocated() if self.cuda else self._rss()
        with self._lock:
            if self.cuda:
                for region in self._open.values():
                    region[2] = max(region[2], peak)
            self._open[kind] = [time.perf_counter(), now, now]

    def _close_region(self, kind: str, stats: PhaseStats | SpanStats) -> int:
        """Add the region `kind`'s time and peak to `stats` (its peak counts in the regions still
        open too); return that peak above the memory in use as the region began."""
        if self.cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() if self.cuda else self._rss()
        with self._lock:
            start, at_start, region_peak = self._open.pop(kind)
            peak = max(peak, region_peak)
            for region in self._open.values():
                region[2] = max(region[2], peak)
        stats.wall_seconds += time.perf_counter() - start  # a retried phase adds up
        stats.peak_memory_bytes = max(stats.peak_memory_bytes, peak)
        return peak - at_start

    @contextmanager
    def span(self, label: str, images: int):
        self._open_region("span")
        stats = self.spans.setdefault(f"{self.current or 'outside any phase'}/{label}", SpanStats())
        stats.calls += 1
        stats.images += images
        try:
            yield
        finally:
            increase = self._close_region("span", stats)
            stats.peak_increase_bytes = max(stats.peak_increase_bytes, increase)

    def begin(self, label: str) -> None:
        self.end()
        self._open_region("phase")
        self.current = label

    def end(self) -> None:
        if self.current is not None:
            self._close_region("phase", self.stats.setdefault(self.current, PhaseStats()))
            self.current = None

    def add_unet(self, calls: int, equivalents: int) -> None:
        stats = self.stats.setdefault(self.current or "outside any phase", PhaseStats())
        stats.unet_calls += calls
        stats.unet_forward_equivalents += equivalents

    def take(self) -> dict[str, PhaseStats]:
        """The phase figures since the last `take` (one identity's), cleared. Spans add up over
        the whole run (`spans`)."""
        self.end()
        stats, self.stats = self.stats, {}
        return stats

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def count_unet(unet: torch.nn.Module, meter: PhaseMeter, recompute: bool) -> torch.utils.hooks.RemovableHandle:
    """Count every forward of `unet` into `meter`'s current phase: 1 call, and its batch as
    forward-equivalents (x3 for a training forward: forward + backward; x4 when `recompute`,
    gradient checkpointing's second forward). A forward with autograd on is a training forward:
    the pipeline samples under `no_grad`/`inference_mode`."""

    def hook(module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        per_image = (4 if recompute else 3) if torch.is_grad_enabled() else 1
        meter.add_unet(1, int(sample.shape[0]) * per_image)

    return unet.register_forward_pre_hook(hook, with_kwargs=True)


def meter_vae(generator, meter: PhaseMeter) -> None:
    """Meter the generator's VAE work as spans of the phase that calls it: every encode
    (`vae_encode`) and decode (`vae_decode`) call of that phase, its images, time and memory.
    The generator's own methods run; only this instance's attributes wrap them."""

    def wrap(method, label: str):
        def metered(images, *args, **kwargs):
            with meter.span(label, len(images)):
                return method(images, *args, **kwargs)

        return metered

    generator.encode_images = wrap(generator.encode_images, "vae_encode")
    generator.decode_latents = wrap(generator.decode_latents, "vae_decode")


def expected_unet_work(g, pipe) -> dict[str, tuple[int, int]]:
    """(calls, forward-equivalents) per identity that the recipe implies, to check the count."""
    cfg = 2 if g.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None else 1

    def sampling(images: int, steps: int) -> tuple[int, int]:
        # UNet calls of one pipeline run: the scheduler's timesteps (PNDM with skip_prk_steps,
        # SD v1.4's sampler, has steps + 1; DDIM has steps), counted on a copy
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(steps)
        per_run = len(scheduler.timesteps)
        runs = [min(g.sample_batch_size, images - s) for s in range(0, images, g.sample_batch_size)]
        return len(runs) * per_run, sum(per_run * b * cfg for b in runs)

    prior = 2 if g.prior_loss_weight > 0 and g.reference_images > 0 else 1
    return {
        "reference_set": sampling(g.reference_images, g.reference_inference_steps or g.num_inference_steps),
        "fine_tune": (g.train_steps, g.train_steps * g.train_batch_size * prior * (4 if g.gradient_checkpointing else 3)),
        "sample": sampling(g.samples_per_identity, g.num_inference_steps),
    }


# -- the plain-diffusers baseline ------------------------------------------------------------
class DiffusersBaseline:
    """The generation work written as plain diffusers code would: pipeline calls for the
    reference set and the samples, the DreamBooth example's prior-preservation loop for the
    fine-tune. Same pipeline object (so the same weights, dtypes, sampler and gradient
    checkpointing setting as ours), same sizes, steps and batches. Prompt encoding and autocast are
    the generator's own helpers (one tokenizer + text encoder call; a plain `torch.autocast`), the
    same calls the example makes."""

    def __init__(self, generator) -> None:
        from diffusers import DDPMScheduler

        self.pipe, self.config, self.device = generator.pipe, generator.config, generator.device
        self._autocast, self._embed = generator.autocast, generator.encode_prompt
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.base = None
        if self.config.finetune == "full":
            self.base = {k: v.detach().to("cpu", copy=True) for k, v in self.pipe.unet.state_dict().items()}

    def _call(self, prompts: Sequence[str], seeds: Sequence[int], steps: int, output_type: str):
        g = self.config
        out = []
        for start in range(0, len(prompts), g.sample_batch_size):
            generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start : start + g.sample_batch_size]]
            with self._autocast():
                result = self.pipe(
                    prompt=list(prompts[start : start + g.sample_batch_size]), height=g.resolution[0],
                    width=g.resolution[1], num_inference_steps=steps, guidance_scale=g.guidance_scale,
                    generator=generators, output_type=output_type,
                )
            out.append(result.images)
        return out

    def reference_set(self, prompt: str) -> torch.Tensor:
        g = self.config
        seeds = list(range(g.reference_images))
        chunks = self._call([prompt] * len(seeds), seeds, g.reference_inference_steps or g.num_inference_steps, "latent")
        return torch.cat(chunks) if chunks else torch.empty(0)

    def sample(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        return [image for chunk in self._call(prompts, seeds, self.config.num_inference_steps, "pil") for image in chunk]

    def fine_tune(self, images: Sequence[Image.Image], instance_prompt: str, prior_latents: torch.Tensor,
                  class_prompt: str, seed: int) -> None:
        from factory.stages.fine_tune import make_optimizer

        g, unet, vae, noise_scheduler = self.config, self.pipe.unet, self.pipe.vae, self.noise_scheduler
        if g.train_steps == 0:
            return
        torch.manual_seed(seed)
        height, width = g.resolution
        pixels = torch.stack([
            torch.from_numpy(np.asarray(im.convert("RGB").resize((width, height), Image.Resampling.BICUBIC), np.float32))
            for im in images
        ]).permute(0, 3, 1, 2) / 127.5 - 1.0
        with torch.no_grad():
            dists = [vae.encode(pixels[s : s + g.vae_batch_size].to(self.device, vae.dtype)).latent_dist
                     for s in range(0, len(pixels), g.vae_batch_size)]
            mean = torch.cat([d.mean.float() for d in dists])
            std = torch.cat([d.std.float() for d in dists])
            instance_embeds, class_embeds = self._embed(instance_prompt), self._embed(class_prompt)
        if g.finetune == "lora":
            from peft import LoraConfig

            unet.requires_grad_(False)
            unet.add_adapter(LoraConfig(r=g.lora.rank, lora_alpha=g.lora.alpha, target_modules=list(g.lora.target_modules),
                                        init_lora_weights="gaussian"))
        else:
            unet.requires_grad_(True)
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, g)  # AdamW, or AdamW8bit as the example's --use_8bit_adam
        scaler = torch.amp.GradScaler("cuda", enabled=g.mixed_precision == "fp16" and self.device.startswith("cuda"))
        with_prior = g.prior_loss_weight > 0 and prior_latents.shape[0] > 0
        prior_latents = prior_latents.to(self.device)
        scaling = vae.config.scaling_factor
        b = g.train_batch_size
        unet.train()
        for _ in range(g.train_steps):
            idx = torch.randint(0, mean.shape[0], (b,), device=mean.device)
            latents = (mean[idx] + std[idx] * torch.randn_like(mean[idx])) * scaling  # latent_dist.sample()
            embeds = instance_embeds.expand(b, -1, -1)
            if with_prior:
                ridx = torch.randint(0, prior_latents.shape[0], (b,), device=prior_latents.device)
                latents = torch.cat([latents, prior_latents[ridx].float()])
                embeds = torch.cat([embeds, class_embeds.expand(b, -1, -1)])
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            with self._autocast():
                model_pred = unet(noisy, timesteps, embeds, return_dict=False)[0]
            epsilon = noise_scheduler.config.prediction_type == "epsilon"
            target = noise if epsilon else noise_scheduler.get_velocity(latents, noise, timesteps)
            if with_prior:
                model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
                target, target_prior = torch.chunk(target, 2, dim=0)
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
            if with_prior:
                loss = loss + g.prior_loss_weight * F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, g.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            loss.detach().item()  # the example logs the loss every step
        del optimizer, params
        unet.requires_grad_(False)
        unet.eval()

    @torch.no_grad()
    def restore(self) -> None:
        if self.base is not None:
            self.pipe.unet.load_state_dict(self.base)
        elif getattr(self.pipe.unet, "peft_config", None):
            self.pipe.unet.unload_lora()


# -- config ----------------------------------------------------------------------------------
def tiny_overrides() -> list[str]:
    """`--set` overrides that swap a preset's models for the embedded default's (demo.yaml's
    demo models and their resolution), keeping every count of the preset."""
    demo = load_run_config(DEFAULT_PRESET)
    values = {
        "generation.base_model": demo.generation.base_model,
        "generation.resolution": list(demo.generation.resolution),
        "output.image_size": list(demo.output.image_size),
        "caption.model": demo.caption.model,
        "filter.reid": demo.filter.reid.model_dump(mode="json"),
        "filter.clip_model": demo.filter.clip_model,
    }
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="preset (default: demo.yaml; paper.yaml with --random-init)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="config overrides, applied after --tiny's")
    parser.add_argument("--identities", type=int, default=3, help="identities measured, after the warm-up identities")
    parser.add_argument("--warmup", type=int, default=1, choices=(0, 1),
                        help="warm-up identities excluded from the figures (0 for a long full-size CPU check)")
    parser.add_argument("--tiny", action="store_true",
                        help="the preset's counts with the embedded default's models at the demo's resolution")
    parser.add_argument("--random-init", action="store_true",
                        help="real SD v1.4 and BLIP-2 OPT-2.7b architectures with random weights")
    parser.add_argument("--baseline", action="store_true", help="also time the same work written as plain diffusers code")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (as a CPU actor)")
    return parser


def load_benchmark_config(args) -> tuple[Path, RunConfig]:
    preset = args.config or (REPO_ROOT / "configs" / ("paper.yaml" if args.random_init else "demo.yaml"))
    overrides = (tiny_overrides() if args.tiny else []) + list(args.overrides)
    return preset, load_run_config(preset, overrides)


# -- the stages ------------------------------------------------------------------------------
def _source_images(identity: int, count: int) -> list[bytes]:
    """Procedural 128x64 pedestrian crops, a different shirt colour per identity."""
    out = []
    for i in range(count):
        image = Image.new("RGB", (64, 128), (90 + 10 * i, 90, 90))
        image.paste(((60 * identity) % 256, 30 + 5 * i, 200 - (40 * identity) % 200), (16, 20, 48, 64))
        image.paste((30, 30, 120), (18, 64, 46, 120))
        out.append(encode_image(image, quality=75))  # PIL's default JPEG quality
    return out


def sequence_rows(n: int, images_per_identity: int) -> pa.Table:
    images = [_source_images(i, images_per_identity) for i in range(n)]
    return pa.table({
        "identity": [f"{SOURCE}/{i}" for i in range(n)], "source": [SOURCE] * n, "source_pid": list(range(n)),
        "camid": [0] * n, "image_paths": [["-"] * images_per_identity] * n, "image_bytes": images,
        "frames": [list(range(images_per_identity))] * n, "seed": list(range(n)),
    }, schema=SEQUENCE_SCHEMA)


def _random_captioner(config, device: str):
    """BLIP-2 OPT-2.7b's architecture with random weights, in the caption dtype, and a processor
    for it (a small trained OPT tokenizer whose ids fit the 50,272-token embedding)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    from full_size_models import BLIP2_QFORMER, BLIP2_VISION, OPT_2_7B
    from factory.models.loading import resolve_dtype
    from demo.tiny import CLIP_MEAN, CLIP_STD
    from demo.tokenizers import train_opt_tokenizer

    tokenizer = train_opt_tokenizer()
    image_processor = BlipImageProcessor(size={"height": 224, "width": 224}, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=32)
    image_token = tokenizer.convert_tokens_to_ids(processor.image_token.content)
    blip = Blip2Config(vision_config=BLIP2_VISION, qformer_config=BLIP2_QFORMER,
                       text_config={**OPT_2_7B, "model_type": "opt"}, num_query_tokens=32, image_token_index=image_token)
    dtype = resolve_dtype(config.dtype, device)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Blip2ForConditionalGeneration(blip).eval()
    finally:
        torch.set_default_dtype(previous)
    return model, processor


def _random_pipeline_loader():
    from demo.tokenizers import train_clip_tokenizer
    from full_size_models import random_stable_diffusion_v1_4

    tokenizer = train_clip_tokenizer()
    return lambda model_id, device: random_stable_diffusion_v1_4(tokenizer).to(device)


def _filter_models(config: RunConfig, pids: Sequence[int], directory: Path) -> dict:
    """A random-init BoT model of the preset's `filter.reid` (the compute of a trained one),
    saved and described as a build's filter model is."""
    from factory.filters.reid import FilterModelSpec
    from trainers.reid.model import build_reid_model
    from trainers.weights import save_state_safetensors

    from factory.filters import FILTERS

    if not FILTERS.get(config.filter.kind).uses_reid_models:
        return {}
    torch.manual_seed(0)
    model = build_reid_model(config.filter.reid, len(pids), init="random").eval()
    weights = save_state_safetensors(model, directory / "model.safetensors")
    spec = FilterModelSpec(Path(weights), config.filter.reid, {pid: i for i, pid in enumerate(pids)})
    spec.save(directory)
    return {SOURCE: spec}


def _release() -> None:
    """Give back the memory of models the caller has just dropped (to the OS too, on a CPU:
    each stage runs in its own actor process in a build, so the next stage here should not
    count the last one's freed heap)."""
    from core.device import return_freed_host_memory

    return_freed_host_memory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Identity:
    name: str
    seconds: dict[str, float] = field(default_factory=dict)
    stats: dict[str, PhaseStats] = field(default_factory=dict)
    baseline: dict[str, PhaseStats] = field(default_factory=dict)
    outside_seconds: float = 0.0  # generation work outside the timed phases (weight restore, output encoding)


class BenchmarkFailed(RuntimeError):
    """An identity failed: its args are (identity, error)."""


def run(args, config: RunConfig, meter: PhaseMeter) -> tuple[list[Identity], dict]:
    from factory.stages.caption import CaptionStage
    from factory.filters import FilterStage
    from factory.stages.generate import GenerationStage

    num_gpus = 1.0 if args.device == "cuda" else 0.0
    n = args.identities + args.warmup
    identities = [Identity(f"{SOURCE}/{i}") for i in range(n)]
    info: dict = {"setup": {}}

    def process(phase: str, stage, batch: pa.Table, identity: Identity) -> pa.Table:
        meter.begin(phase)
        out = stage.process_batch(batch)
        identity.stats.update(meter.take())
        identity.seconds[phase] = out.column(f"{phase}_seconds")[0].as_py()
        return out

    # caption
    start = time.perf_counter()
    caption = CaptionStage(config.caption, num_gpus)
    if args.random_init:
        caption.device = "cuda" if num_gpus else "cpu"
        caption.model, caption.processor = _random_captioner(config.caption, caption.device)
    else:
        caption.setup()
    info["setup"]["caption"] = time.perf_counter() - start
    table = sequence_rows(n, config.sequences.max_images)
    captioned = [process("caption", caption, table.slice(i, 1), identity) for i, identity in enumerate(identities)]
    info["caption"] = captioned[0].column("caption")[0].as_py()
    caption.model = caption.processor = None
    del caption
    _release()

    # generate (ours, then the baseline, identity by identity)
    g = config.generation
    loader = _random_pipeline_loader() if args.random_init else None
    stage = GenerationStage(g, config.output, num_gpus, args.threads, g.debug_fail_identities, loader=loader)
    start = time.perf_counter()
    stage.setup()
    info["setup"]["generate"] = time.perf_counter() - start
    generator = stage.generator
    if bool(generator.unet.is_gradient_checkpointing) != g.gradient_checkpointing:
        raise RuntimeError("the UNet's gradient checkpointing differs from generation.gradient_checkpointing")
    handle = count_unet(generator.unet, meter, recompute=g.gradient_checkpointing)
    generator.phase_listeners.append(meter.begin)
    meter_vae(generator, meter)
    info["scheduler"] = type(generator.pipe.scheduler).__name__
    info["expected"] = expected_unet_work(g, generator.pipe)
    baseline = DiffusersBaseline(generator) if args.baseline else None
    generated = []
    for number, (identity, row) in enumerate(zip(identities, captioned)):
        if number == args.warmup:
            meter.spans.clear()  # VAE figures of the measured identities only
        start = time.perf_counter()
        out = stage.process_batch(row)
        meter.end()
        wall = time.perf_counter() - start
        result = out.to_pylist()[0]
        if result["status"] != "ok":
            raise BenchmarkFailed(identity.name, f"{result['error']} (after {result['attempts']} attempts)")
        identity.seconds.update(dict(result["timings"]))
        identity.outside_seconds = wall - sum(identity.seconds[p] for p in GENERATION_PHASES)
        identity.stats.update(meter.take())
        generated.append(out)
        if baseline is not None:
            _run_baseline(baseline, meter, result)
            identity.baseline = meter.take()
    info["model_loads"] = stage.model_loads
    info["vae"] = {key: asdict(stats) for key, stats in meter.spans.items()}
    handle.remove()
    del generator, baseline
    stage.generator = None
    del stage
    _release()

    # filter
    with tempfile.TemporaryDirectory() as tmp:
        models = _filter_models(config, list(range(n)), Path(tmp))
        start = time.perf_counter()
        filtering = FilterStage(config.filter, models, num_gpus)
        filtering.setup()
        info["setup"]["filter"] = time.perf_counter() - start
        for identity, row in zip(identities, generated):
            process("filter", filtering, row, identity)
        del filtering
        _release()
    return identities, info


def _run_baseline(baseline: DiffusersBaseline, meter: PhaseMeter, row: dict) -> None:
    from factory.sequences import stable_seed

    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in row["image_bytes"]]
    meter.begin("reference_set")
    reference = baseline.reference_set(row["reference_prompt"])
    meter.begin("fine_tune")
    baseline.fine_tune(images, row["prompt"], reference, row["reference_prompt"], stable_seed(row["seed"], "train"))
    meter.begin("sample")
    baseline.sample(row["sample_prompts"], row["sample_seeds"])
    meter.end()
    baseline.restore()


# -- report ----------------------------------------------------------------------------------
def summarize(identities: Sequence[Identity], baseline: bool, warmup: int = 1) -> dict[str, dict]:
    measured = identities[warmup:]
    phases = {}
    for phase in PHASES:
        stats = [i.stats.get(phase, PhaseStats()) for i in measured]
        base = [i.baseline[phase].wall_seconds for i in measured if phase in i.baseline]
        phases[phase] = {"seconds": sum(i.seconds.get(phase, 0.0) for i in measured) / len(measured)}
        for key in ("unet_calls", "unet_forward_equivalents"):  # a whole mean stays an int
            value = sum(getattr(s, key) for s in stats) / len(measured)
            phases[phase][key] = int(value) if value.is_integer() else value
        phases[phase].update(
            peak_memory_bytes=max(s.peak_memory_bytes for s in stats),
            baseline_seconds=sum(base) / len(base) if baseline and base and len(base) == len(measured) else None,
        )
    return phases


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def describe_device(device: str, threads: int) -> str:
    if device == "cuda":
        return f"cuda ({torch.cuda.get_device_name()})"
    return f"cpu ({threads} torch thread{'s' if threads != 1 else ''})"


def print_report(args, preset: Path, config: RunConfig, identities: Sequence[Identity], info: dict,
                 phases: dict, device: str) -> None:
    g = config.generation
    measured = identities[args.warmup:]
    model = "random-init SD v1.4" if args.random_init else g.base_model
    prior = f" (+{g.train_batch_size} prior)" if g.prior_loss_weight > 0 and g.reference_images > 0 else ""
    cfg = "CFG on" if g.guidance_scale > 1 else "CFG off"
    print(f"preset {preset.name}{' --tiny (demo models, demo resolution)' if args.tiny else ''} | {model} | "
          f"caption {config.caption.model if not args.random_init else 'random-init BLIP-2 OPT-2.7b'} | "
          f"filter {config.filter.kind} | device {device}")
    print(f"recipe: {g.resolution[0]}x{g.resolution[1]}, {g.reference_images} reference images x "
          f"{g.reference_inference_steps or g.num_inference_steps} steps, {g.train_steps} train steps x batch "
          f"{g.train_batch_size}{prior}, {g.samples_per_identity} samples x {g.num_inference_steps} steps, "
          f"sample batch {g.sample_batch_size}, vae batch {g.vae_batch_size}, {info['scheduler']}, "
          f"guidance {g.guidance_scale} ({cfg}), finetune {g.finetune}, mixed precision {g.mixed_precision}, "
          f"gradient checkpointing {'on' if g.gradient_checkpointing else 'off'}, 8-bit Adam {'on' if g.use_8bit_adam else 'off'}")
    print("setup (not in the figures): " + ", ".join(f"{k} {v:.2f} s" for k, v in info["setup"].items())
          + f"; base model loads: {info['model_loads']}")
    print(f"caption of {identities[0].name}: {info['caption']!r}")
    warmup = f"after 1 warm-up identity ({identities[0].name}, excluded)" if args.warmup else "no warm-up identity"
    print(f"measured {len(measured)} identities ({measured[0].name} .. {measured[-1].name}), {warmup}; "
          "per identity, mean (peak memory: max)")
    memory = "peak alloc" if device.startswith("cuda") else "peak RSS"
    print(f"  {'phase':<14}{'s/identity':>11}{'UNet calls':>12}{'UNet fwd-eq':>13}{memory:>13}"
          + (f"{'baseline s':>12}{'ours/base':>11}" if args.baseline else ""))
    for phase in PHASES:
        p, b = phases[phase], phases[phase]["baseline_seconds"]
        versus = f"{b:>12.3f}{p['seconds'] / b:>11.3f}" if b else f"{'-':>12}{'-':>11}"
        print(f"  {phase:<14}{p['seconds']:>11.3f}{p['unet_calls']:>12}{p['unet_forward_equivalents']:>13}"
              f"{_gib(p['peak_memory_bytes']):>13}" + (versus if args.baseline else ""))
    keys = ("seconds", "unet_calls", "unet_forward_equivalents")
    seconds, calls, fwd = (sum(p[k] for p in phases.values()) for k in keys)
    line = f"  {'total':<14}{seconds:>11.3f}{calls:>12}{fwd:>13}{'':>13}"
    if args.baseline:
        base = sum(phases[p]["baseline_seconds"] or 0.0 for p in GENERATION_PHASES)
        ours = sum(phases[p]["seconds"] for p in GENERATION_PHASES)
        line += (f"{base:>12.3f}{ours / base:>11.3f}" if base else "") + "   (ours/base: generation phases)"
    print(line)
    outside = sum(i.outside_seconds for i in measured) / len(measured)
    print(f"  generation work outside the phases (weight restore, output encoding): {outside:.3f} s/identity")

    if info.get("vae"):
        print(f"VAE work inside the phases (all {len(measured)} measured identities; peak: max over the calls)")
        print(f"  {'phase/region':<26}{'calls':>6}{'images':>8}{'seconds':>10}{memory:>13}{'above start':>13}")
        for key, span in info["vae"].items():
            print(f"  {key:<26}{span['calls']:>6}{span['images']:>8}{span['wall_seconds']:>10.3f}"
                  f"{_gib(span['peak_memory_bytes']):>13}{_gib(span['peak_increase_bytes']):>13}")

    checks = []
    for phase, (calls, fwd) in info["expected"].items():
        got = (phases[phase]["unet_calls"], phases[phase]["unet_forward_equivalents"])
        checks.append(f"{phase} {'ok' if got == (calls, fwd) else f'MISMATCH (expected {calls} calls, {fwd} fwd-eq)'}")
    print("UNet work vs the recipe's formula: " + ", ".join(checks))
    if args.baseline:
        same = all(
            (i.stats[p].unet_calls, i.stats[p].unet_forward_equivalents)
            == (i.baseline[p].unet_calls, i.baseline[p].unet_forward_equivalents)
            for i in measured for p in GENERATION_PHASES if p in i.stats and p in i.baseline
        )
        print(f"baseline UNet work equal to ours: {'yes' if same else 'NO'} "
              "(ours also decodes a few reference previews in reference_set)")

    print("per identity:")
    print(f"  {'identity':<10}" + "".join(f"{p:>14}" for p in PHASES) + f"{'total s':>10}{'UNet fwd-eq':>13}")
    for i, identity in enumerate(identities):
        seconds = [identity.seconds.get(p, 0.0) for p in PHASES]
        fwd = sum(s.unet_forward_equivalents for p, s in identity.stats.items() if p in PHASES)
        print(f"  {identity.name:<10}" + "".join(f"{s:>14.3f}" for s in seconds) + f"{sum(seconds):>10.3f}{fwd:>13}"
              + ("   (warm-up, excluded)" if i < args.warmup else ""))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for bad, error in ((args.identities < 1, "--identities must be at least 1"),
                       (args.tiny and args.random_init, "--tiny and --random-init exclude each other"),
                       (args.device == "cuda" and not torch.cuda.is_available(), "--device cuda but no CUDA device")):
        if bad:
            print(f"error: {error}", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    preset, config = load_benchmark_config(args)
    from factory.filters import FILTERS

    if args.random_init and not FILTERS.get(config.filter.kind).uses_reid_models:
        print("error: --random-init times filters that use Re-ID models (reid, cctf; no random-init CLIP here)",
              file=sys.stderr)
        return 2
    if not args.random_init:
        from factory.build import resolve_models

        resolve_models(config, log=lambda message: print(message, file=sys.stderr))

    device = describe_device(args.device, args.threads)
    meter = PhaseMeter(args.device)
    try:
        identities, info = run(args, config, meter)
    except BenchmarkFailed as err:
        failed, info = [{"identity": err.args[0], "error": err.args[1]}], {}
    else:
        failed = []
    finally:
        meter.close()

    if failed:
        print(f"FAILED: identity {failed[0]['identity']}: {failed[0]['error']}", file=sys.stderr)
        print("the benchmark measures only complete identities: no figures", file=sys.stderr)
        figures = ("seconds", "unet_calls", "unet_forward_equivalents", "peak_memory_bytes", "baseline_seconds")
        phases = {p: dict.fromkeys(figures) for p in PHASES}
    else:
        phases = summarize(identities, args.baseline, args.warmup)
        print_report(args, preset, config, identities, info, phases, device)
    if args.json is not None:
        report = {"device": device, "identities": args.identities, "failed": failed, "phases": phases,
                  "vae": info.get("vae", {})}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
