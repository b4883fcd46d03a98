"""Diversity Injection: per-identity DreamBooth fine-tuning with the Fine-Grain-Specific Prior
Preservation Loss (paper Eq. 1), then sampling with the IIR prompt and attribute variations.

One actor holds the base text-to-image pipeline once. For each identity it
  a. generates the Attribute Reference Set with the *base* weights from the LPE prompt
     without the IIR token,
  b. fine-tunes the UNet on the identity's images (prompt with IIR) plus the reference set,
  c. samples N images with the IIR prompt plus seeded variations,
  d. restores the base weights in memory (a copy taken at setup; no reload from disk).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

from factory.schema import CAPTIONED_SCHEMA, GENERATION_FIELDS, append_columns, require_columns
from factory.sequences import stable_seed
from factory.stage_config import GenerationConfig, OutputConfig, VariationConfig
from factory.stages.base import Stage, StageResources


@dataclass(frozen=True)
class PriorPreservationTerms:
    total: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor


class PriorPreservationLoss(torch.nn.Module):
    """Fine-Grain-Specific Prior Preservation Loss (Eq. 1):
    `MSE(instance) + λ · MSE(Attribute Reference Set)`.

    Eq. 1 is written for an x-prediction model with per-timestep weights w_t; with Stable
    Diffusion's ε- (or v-) prediction the same objective is the plain MSE between the predicted
    and the true noise (velocity), the usual DreamBooth parameterisation. λ = 0 is DreamBooth
    without prior preservation.
    """

    def __init__(self, prior_weight: float) -> None:
        super().__init__()
        if prior_weight < 0:
            raise ValueError(f"prior_weight must be >= 0, got {prior_weight}")
        self.prior_weight = prior_weight

    def forward(
        self,
        instance_pred: torch.Tensor,
        instance_target: torch.Tensor,
        prior_pred: torch.Tensor | None = None,
        prior_target: torch.Tensor | None = None,
    ) -> PriorPreservationTerms:
        instance = F.mse_loss(instance_pred.float(), instance_target.float())
        if prior_pred is None or prior_target is None:
            prior = instance.new_zeros(())
        else:
            prior = F.mse_loss(prior_pred.float(), prior_target.float())
        return PriorPreservationTerms(instance + self.prior_weight * prior, instance, prior)


def sample_prompt(prompt: str, variations: VariationConfig, rng: random.Random) -> str:
    """Append, per category and with probability `variations.probability`, one phrase."""
    phrases = []
    for category in ("clothing", "carried_items", "action", "camera_pose", "scene"):
        options: list[str] = getattr(variations, category)
        if options and rng.random() < variations.probability:
            phrases.append(rng.choice(options))
    return ", ".join([prompt, *phrases]) if phrases else prompt


def encode_image(image: Image.Image, size: tuple[int, int], fmt: str, quality: int) -> bytes:
    """Resize to (height, width) and encode; outputs are stored at the paper's 256x128."""
    height, width = size
    image = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def module_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer: equal fingerprints mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class IdentityOutput:
    images: list[Image.Image]
    seeds: list[int]
    prompts: list[str]
    reference_images: list[Image.Image]
    timings: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)


def _make_optimizer(params, config: GenerationConfig) -> torch.optim.Optimizer:
    if config.use_8bit_adam:
        # No silent fallback to AdamW: the build's check phase has refused this setting where
        # bitsandbytes cannot load, so an ImportError here is a real fault of this node.
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=config.learning_rate)
    return torch.optim.AdamW(params, lr=config.learning_rate)


class DiversityInjectionGenerator:
    """Per-identity fine-tune-and-sample around one loaded `StableDiffusionPipeline`."""

    def __init__(self, pipeline, config: GenerationConfig, device: str = "cpu") -> None:
        from diffusers import DDPMScheduler

        self.pipe = pipeline
        self.config = config
        self.device = device
        self.pipe.set_progress_bar_config(disable=True)
        self.unet = pipeline.unet
        self.vae = pipeline.vae.requires_grad_(False)
        self.text_encoder = pipeline.text_encoder.requires_grad_(False)
        self.tokenizer = pipeline.tokenizer
        # Training noise follows the model's own schedule (SD v1.4: scaled-linear DDPM betas).
        self.train_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.loss_fn = PriorPreservationLoss(config.prior_loss_weight)
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        # The base weights, kept once in memory: restoring them is a copy, not a disk reload.
        self._base_state = {k: v.detach().clone() for k, v in self.unet.state_dict().items()}

    # -- building blocks -------------------------------------------------------------------
    def _autocast(self):
        if self.config.mixed_precision == "no":
            return nullcontext()
        dtype = torch.float16 if self.config.mixed_precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type="cuda" if self.device.startswith("cuda") else "cpu", dtype=dtype)

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        tokens = self.tokenizer(
            prompt, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        return self.text_encoder(tokens.input_ids.to(self.device))[0]

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior (mean, std) of images resized to the training resolution."""
        height, width = self.config.resolution
        arrays = [
            np.asarray(img.convert("RGB").resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
            for img in images
        ]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return dist.mean, dist.std

    def generate_images(self, prompts: Sequence[str], seeds: Sequence[int], steps: int) -> list[Image.Image]:
        """Sample one image per (prompt, seed); each image depends only on its own seed."""
        height, width = self.config.resolution
        images: list[Image.Image] = []
        batch = self.config.sample_batch_size
        self.unet.eval()
        for start in range(0, len(prompts), batch):
            chunk_prompts = list(prompts[start : start + batch])
            generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start : start + batch]]
            with torch.inference_mode(), self._autocast():
                result = self.pipe(
                    prompt=chunk_prompts,
                    height=height,
                    width=width,
                    num_inference_steps=steps,
                    guidance_scale=self.config.guidance_scale,
                    generator=generators,
                    output_type="pil",
                )
            images.extend(result.images)
        return images

    def fine_tune(
        self,
        instance_images: Sequence[Image.Image],
        instance_prompt: str,
        reference_images: Sequence[Image.Image],
        reference_prompt: str,
        seed: int,
    ) -> list[float]:
        """DreamBooth-style fine-tuning of the UNet with the prior-preservation loss (Eq. 1)."""
        cfg = self.config
        if cfg.train_steps == 0:
            return []
        generator = torch.Generator("cpu").manual_seed(seed)
        inst_mean, inst_std = self.encode_images(instance_images)
        inst_text = self.encode_prompt(instance_prompt)
        use_prior = cfg.prior_loss_weight > 0 and len(reference_images) > 0
        if use_prior:
            ref_mean, ref_std = self.encode_images(reference_images)
            ref_text = self.encode_prompt(reference_prompt)
        scaling = self.vae.config.scaling_factor
        num_timesteps = self.train_scheduler.config.num_train_timesteps
        prediction_type = self.train_scheduler.config.prediction_type

        optimizer = _make_optimizer([p for p in self.unet.parameters() if p.requires_grad], cfg)
        scaler = torch.amp.GradScaler("cuda", enabled=cfg.mixed_precision == "fp16" and self.device.startswith("cuda"))
        losses: list[float] = []
        self.unet.train()
        b = cfg.train_batch_size
        for _ in range(cfg.train_steps):
            idx = torch.randint(0, inst_mean.shape[0], (b,), generator=generator)
            means, stds, texts = [inst_mean[idx]], [inst_std[idx]], [inst_text.expand(b, -1, -1)]
            if use_prior:
                ridx = torch.randint(0, ref_mean.shape[0], (b,), generator=generator)
                means.append(ref_mean[ridx])
                stds.append(ref_std[ridx])
                texts.append(ref_text.expand(b, -1, -1))
            mean, std, text = torch.cat(means), torch.cat(stds), torch.cat(texts)
            eps = torch.randn(mean.shape, generator=generator).to(self.device, mean.dtype)
            latents = (mean + std * eps) * scaling
            noise = torch.randn(latents.shape, generator=generator).to(self.device, latents.dtype)
            timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=generator).to(self.device)
            noisy = self.train_scheduler.add_noise(latents, noise, timesteps)
            target = noise if prediction_type == "epsilon" else self.train_scheduler.get_velocity(latents, noise, timesteps)
            with self._autocast():
                pred = self.unet(noisy, timesteps, text).sample
            if use_prior:
                pred_inst, pred_prior = pred.chunk(2)
                target_inst, target_prior = target.chunk(2)
                terms = self.loss_fn(pred_inst, target_inst, pred_prior, target_prior)
            else:
                terms = self.loss_fn(pred, target)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms.total).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(terms.total.detach()))
        self.unet.eval()
        return losses

    @torch.no_grad()
    def restore_base_weights(self) -> None:
        self.unet.load_state_dict(self._base_state)

    # -- one identity ------------------------------------------------------------------------
    def process_identity(
        self,
        instance_images: Sequence[Image.Image],
        prompt: str,
        reference_prompt: str,
        identity_seed: int,
    ) -> IdentityOutput:
        cfg = self.config
        timings: dict[str, float] = {}
        try:
            start = time.perf_counter()
            ref_seeds = [stable_seed(identity_seed, "reference", i) for i in range(cfg.reference_images)]
            ref_steps = cfg.reference_inference_steps or cfg.num_inference_steps
            reference = self.generate_images([reference_prompt] * len(ref_seeds), ref_seeds, ref_steps)
            timings["reference_set"] = time.perf_counter() - start

            start = time.perf_counter()
            losses = self.fine_tune(instance_images, prompt, reference, reference_prompt, stable_seed(identity_seed, "train"))
            timings["fine_tune"] = time.perf_counter() - start

            start = time.perf_counter()
            seeds = [stable_seed(identity_seed, "sample", i) for i in range(cfg.samples_per_identity)]
            prompts = [sample_prompt(prompt, cfg.variations, random.Random(s)) for s in seeds]
            images = self.generate_images(prompts, seeds, cfg.num_inference_steps)
            timings["sample"] = time.perf_counter() - start
        finally:
            # Whatever happened, the next identity starts from the base model.
            self.restore_base_weights()
        return IdentityOutput(images, seeds, prompts, reference, timings, losses)


PipelineLoader = Callable[[str, str], object]


def _default_loader(model_id: str, device: str):
    from factory.models.loading import load_text_to_image

    return load_text_to_image(model_id, device, torch.float32)


class GenerationStage(Stage):
    """Ray actor body for DI: loads the base pipeline once in `setup`, then processes identities."""

    name = "generate"

    def __init__(
        self,
        config: GenerationConfig,
        output: OutputConfig,
        num_gpus: float = 0.0,
        num_threads: int | None = None,
        fail_identities: Sequence[str] = (),
        loader: PipelineLoader | None = None,
    ) -> None:
        self.config = config
        self.output = output
        self.num_gpus = num_gpus
        self.num_threads = num_threads
        self.fail_identities = set(fail_identities)
        self.loader = loader or _default_loader
        self.generator: DiversityInjectionGenerator | None = None
        self.model_loads = 0

    def resources(self) -> StageResources:
        c = self.config.concurrency
        return StageResources(1, c.min, c.max, float(self.num_threads or 1), self.num_gpus)

    def setup(self) -> None:
        # The IIR token was checked against this model's tokenizer by the build's check phase
        # (factory.preflight), before any model loaded.
        if self.num_threads:
            # Same thread count on every actor keeps CPU results bit-reproducible across reruns.
            torch.set_num_threads(self.num_threads)
        device = "cuda" if self.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        pipeline = self.loader(self.config.base_model, device)
        self.model_loads += 1
        self.generator = DiversityInjectionGenerator(pipeline, self.config, device)

    def _run_identity(self, row: dict) -> IdentityOutput:
        assert self.generator is not None, "call setup() first"
        if row["identity"] in self.fail_identities:
            raise RuntimeError(f"injected failure for {row['identity']} (generation.debug_fail_identities)")
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in row["image_bytes"]]
        return self.generator.process_identity(images, row["prompt"], row["reference_prompt"], row["seed"])

    def process_batch(self, batch: pa.Table) -> pa.Table:
        require_columns(batch, CAPTIONED_SCHEMA, self.name)
        values: dict[str, list] = {name: [] for name, _ in GENERATION_FIELDS}
        out = self.output
        for row in batch.to_pylist():
            result, error, attempts = None, "", 0
            for attempts in range(1, self.config.max_retries + 2):
                try:
                    result = self._run_identity(row)
                    break
                except Exception as err:  # one identity's failure must not end the run
                    error = f"{type(err).__name__}: {err}"
            ok = result is not None
            values["status"].append("ok" if ok else "failed")
            values["error"].append("" if ok else error)
            values["generated"].append(
                [encode_image(i, out.image_size, out.image_format, out.jpeg_quality) for i in result.images] if ok else []
            )
            values["sample_seeds"].append(result.seeds if ok else [])
            values["sample_prompts"].append(result.prompts if ok else [])
            values["reference_preview"].append(
                [encode_image(i, out.image_size, "jpeg", 90) for i in result.reference_images[:4]] if ok else []
            )
            values["timings"].append(json.dumps(result.timings if ok else {}))
            values["model_loads"].append(self.model_loads)
            values["attempts"].append(attempts)
        return append_columns(batch, GENERATION_FIELDS, values)
