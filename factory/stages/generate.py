"""Diversity Injection: per-identity DreamBooth fine-tuning with the Fine-Grain-Specific Prior
Preservation Loss (paper Eq. 1), then sampling with the IIR prompt and attribute variations.

One actor holds the base text-to-image pipeline once. For each identity it
  a. generates the Attribute Reference Set with the *base* weights from the LPE prompt
     without the IIR token,
  b. fine-tunes the UNet on the identity's images (prompt with IIR) plus the reference set,
  c. samples N images with the IIR prompt plus seeded variations,
  d. restores the base weights from a copy taken at setup (`BaseWeightCopy`: pinned host
     memory beside a GPU, a local file on a CPU; never a reload of the model).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from core.device import StickyCudaError, actor_device, is_sticky_cuda_error, node_name, return_freed_host_memory
from core.storage import resolve
from factory.schema import CAPTIONED_SCHEMA, GENERATION_FIELDS
from factory.sequences import stable_seed
from core.settings.stages import GenerationConfig, OutputConfig, VariationConfig, fault_target
from core.shards import encode_image
from factory.models.shipping import ModelFolders
from factory.stages.base import RowStage, StageResources, decode_images
from factory.stages.base_weights import BaseWeightCopy


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

    def forward(self, instance_pred: torch.Tensor, instance_target: torch.Tensor,
                prior_pred: torch.Tensor | None = None, prior_target: torch.Tensor | None = None
                ) -> PriorPreservationTerms:
        instance = F.mse_loss(instance_pred.float(), instance_target.float())
        no_prior = prior_pred is None or prior_target is None
        prior = instance.new_zeros(()) if no_prior else F.mse_loss(prior_pred.float(), prior_target.float())
        return PriorPreservationTerms(instance + self.prior_weight * prior, instance, prior)


def variation_phrases(variations: VariationConfig, rng: random.Random) -> list[str]:
    """Per category and with probability `variations.probability`, one phrase."""
    phrases = []
    for category in ("clothing", "carried_items", "action", "camera_pose", "scene"):
        options: list[str] = getattr(variations, category)
        if options and rng.random() < variations.probability:
            phrases.append(rng.choice(options))
    return phrases


def fit_prompt(prompt: str, caption: str, phrases: Sequence[str], count_tokens: Callable[[str], int],
               limit: int) -> str:
    """`prompt` with `phrases` appended (", "-joined), within `limit` tokens.

    The text encoder sees `limit` tokens (CLIP: 77); past them the tokenizer truncates, which
    would drop the variation phrases, the part that makes the samples diverse. So words are
    dropped from the end of the caption part of `prompt` instead (the text `caption` fills in the
    prompt template), never from the template's head ("a photo of zwx person") or the phrases,
    until the count fits. A prompt that fits is returned as it is, phrases appended. When even
    the caption-less prompt does not fit, that is returned and the tokenizer truncates it."""
    full = ", ".join([prompt, *phrases])
    at = prompt.rfind(caption) if caption else -1
    if at < 0 or count_tokens(full) <= limit:
        return full
    head, tail, words = prompt[:at], prompt[at + len(caption):], caption.split()

    def with_words(n: int) -> str:
        # As factory.stages.caption.build_prompts strips the formatted template.
        kept = (head + " ".join(words[:n]).rstrip(" ,") + tail).strip(" ,")
        return ", ".join([kept, *phrases])

    fits, too_long = 0, len(words)  # the most caption words that fit lie in [fits, too_long)
    while too_long - fits > 1:  # the count grows with the words kept: a binary search
        middle = (fits + too_long) // 2
        if count_tokens(with_words(middle)) <= limit:
            fits = middle
        else:
            too_long = middle
    return with_words(fits)


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
    reference_images: list[Image.Image]  # previews only: the set itself stays latents
    timings: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    reference_reused: bool = False  # the set came from the store (another identity's prompt)


# Sampler choice: diffusers' scheduler classes built `from_config` of the model's own scheduler,
# so the noise schedule (betas, timestep spacing) stays the model's.
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
}
MIXED_PRECISION_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
LORA_ADAPTER = "identity"
REFERENCE_PREVIEWS = 4  # reference images decoded for the contact sheet; the rest stay latents
_LARGE_UNET_BYTES = 2**30  # SD v1.4's UNet: 3.4 GB in fp32; the demo's: a few MB


def sampling_scheduler(model_scheduler, name: str):
    """The scheduler `name` configured like `model_scheduler`; `model` keeps it as it is."""
    if name == "model":
        return model_scheduler
    import diffusers

    class_name, options = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(model_scheduler.config, **options)


def reference_set_key(config: GenerationConfig, reference_prompt: str) -> str:
    """What an Attribute Reference Set depends on, hashed: identities whose LPE prompt without
    the IIR is the same share one set (model, prompt, sampler, steps, guidance, size, count, seed)."""
    fields = {
        "model": config.base_model, "prompt": reference_prompt, "scheduler": config.scheduler,
        "steps": config.reference_inference_steps or config.num_inference_steps, "guidance": config.guidance_scale,
        "resolution": list(config.resolution), "count": config.reference_images, "seed": config.seed,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


class ReferenceSetStore:
    """Attribute Reference Sets as latents under the output location (`DIR/reference_sets/`),
    one safetensors file per key, written atomically by the actor that sampled it, so another
    actor (or a rerun) with the same reference prompt loads it instead of sampling it again."""

    def __init__(self, root: str) -> None:
        self.root = resolve(root)

    def get(self, key: str) -> torch.Tensor | None:
        from safetensors.torch import load

        location = self.root / f"{key}.safetensors"
        try:
            return load(location.read_bytes())["latents"] if location.is_file() else None
        except Exception:  # a damaged file: sample the set again (and rewrite it)
            return None

    def put(self, key: str, latents: torch.Tensor) -> None:
        from safetensors.torch import save

        (self.root / f"{key}.safetensors").write_bytes(save({"latents": latents.detach().cpu().contiguous()}))


def _make_optimizer(params, config: GenerationConfig) -> torch.optim.Optimizer:
    lr = config.lora.learning_rate if config.finetune == "lora" else config.learning_rate
    if config.use_8bit_adam:
        # No silent fallback to AdamW: the build's check phase has refused this setting where
        # bitsandbytes cannot load, so an ImportError here is a real fault of this node.
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr)


class DiversityInjectionGenerator:
    """Per-identity fine-tune-and-sample around one loaded `StableDiffusionPipeline`.

    Memory plan (the paper recipe on one 24 GB GPU): the frozen VAE runs in the mixed-precision
    dtype, and so does a LoRA fine-tune's frozen UNet (its adapter stays fp32); the VAE encodes
    and decodes `vae_batch_size` images at a time; the Attribute Reference Set stays latents
    (only a few previews are decoded); the base UNet weights are kept in pinned host memory for
    the restore (in a local file when the UNet itself is in host memory), or not at all with LoRA
    (the adapter is dropped); gradients and optimizer state are freed before sampling, and on a
    CPU handed back to the OS. The text encoder, the latents and the sampler stay fp32.
    """

    def __init__(self, pipeline, config: GenerationConfig, device: str = "cpu",
                 references: ReferenceSetStore | None = None) -> None:
        from diffusers import DDPMScheduler

        self.references = references
        self.pipe = pipeline
        self.config = config
        self.device = device
        self.pipe.set_progress_bar_config(disable=True)
        self.unet = pipeline.unet.requires_grad_(False)  # trainable only inside `fine_tune`
        frozen_dtype = MIXED_PRECISION_DTYPES.get(config.mixed_precision)
        self.vae = pipeline.vae.requires_grad_(False)
        # The text encoder keeps fp32 weights (it runs under autocast like the UNet): the
        # pipeline creates its latents in the prompt embeddings' dtype, the text encoder's, and a
        # bf16 encoder would make the sampler integrate in bf16 (an 8-bit mantissa).
        self.text_encoder = pipeline.text_encoder.requires_grad_(False)
        if frozen_dtype is not None:
            self.vae.to(dtype=frozen_dtype)
            if config.finetune == "lora":
                # LoRA never writes the base weights: they stay in the half dtype for good (autocast
                # would otherwise re-cast all 860M of them at every forward); the adapter is fp32.
                self.unet.to(dtype=frozen_dtype)
        self.tokenizer = pipeline.tokenizer
        # Training noise follows the model's own schedule (SD v1.4: scaled-linear DDPM betas).
        self.train_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.pipe.scheduler = sampling_scheduler(pipeline.scheduler, config.scheduler)
        self.loss_fn = PriorPreservationLoss(config.prior_loss_weight)
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.phase = "setup"  # the phase running now, named when an identity fails
        # Called with the phase's name as each phase of an identity starts: observers (the cost
        # benchmark's meters) stay; `fault` is the current identity's injected failure, if any.
        self.phase_listeners: list[Callable[[str], None]] = []
        self.fault: Callable[[str], None] | None = None
        # Full fine-tune: a copy of the base weights for the restore after each identity. LoRA
        # never touches them, so it keeps none.
        self._base_copy = BaseWeightCopy(self.unet, device) if config.finetune == "full" else None
        # After sampling, a full garbage-collector pass (~0.35 s) pays only where what cycles hold
        # is large: at SD v1.4 size skipping it left sample/vae_decode 0.7 GiB higher (7.07 GiB);
        # with the demo's tiny UNet it is a quarter of each short sampling call.
        unet_bytes = sum(p.numel() * p.element_size() for p in self.unet.parameters())
        self._collect_after_sampling = unet_bytes >= _LARGE_UNET_BYTES

    # -- building blocks -------------------------------------------------------------------
    def _autocast(self):
        dtype = MIXED_PRECISION_DTYPES.get(self.config.mixed_precision)  # None: "no"
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        return nullcontext() if dtype is None else torch.autocast(device_type=device_type, dtype=dtype)

    @contextmanager
    def _fp32_noise_predictions(self) -> Iterator[None]:
        """Under mixed precision, hand the sampler the UNet's predictions in fp32: the pipeline's
        guidance sum and the scheduler's update (multistep history included) then run in fp32
        on fp32 latents, as without autocast; only the UNet's own work is in the half dtype."""
        if self.config.mixed_precision == "no":
            yield
            return

        def to_fp32(_module, _args, output):
            return tuple(o.float() for o in output) if isinstance(output, tuple) else output  # return_dict=False

        handle = self.unet.register_forward_hook(to_fp32)
        try:
            yield
        finally:
            handle.remove()

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """The prompt's fp32 embeddings, computed as the pipeline computes them when sampling
        (under the same autocast), so the fine-tune and the samples see the same embeddings."""
        tokens = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        with self._autocast():
            return self.text_encoder(tokens.input_ids.to(self.device))[0].float()

    def count_tokens(self, prompt: str) -> int:
        """Tokens of `prompt` as the text encoder would see them untruncated (with BOS and EOS);
        not verbose: counting a long prompt is not feeding it to the model."""
        return len(self.tokenizer(prompt, truncation=False, verbose=False).input_ids)

    def fit_prompts(self, prompt: str, caption: str, seeds: Sequence[int]) -> list[str]:
        """The sampling prompt of each seed: `prompt` plus its seeded variation phrases, the
        caption part shortened where the whole would not fit the text encoder (`fit_prompt`)."""
        limit = self.tokenizer.model_max_length
        return [fit_prompt(prompt, caption, variation_phrases(self.config.variations, random.Random(s)),
                           self.count_tokens, limit) for s in seeds]

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior (mean, std), float32, of images resized to the training resolution,
        `vae_batch_size` images per encoder call."""
        height, width = self.config.resolution
        means, stds = [], []
        for start in range(0, len(images), self.config.vae_batch_size):
            chunk = images[start : start + self.config.vae_batch_size]
            # Not VaeImageProcessor.preprocess: it resizes with Lanczos, and bicubic is what every
            # earlier build was trained on (the same rows from the same config).
            arrays = [np.asarray(img.convert("RGB").resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
                      for img in chunk]
            pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
            dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        return torch.cat(means), torch.cat(stds)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """Scaled latents -> PIL images, `vae_batch_size` at a time (as the pipeline decodes)."""
        images: list[Image.Image] = []
        scaling = self.vae.config.scaling_factor
        for start in range(0, latents.shape[0], self.config.vae_batch_size):
            chunk = latents[start : start + self.config.vae_batch_size].to(self.vae.dtype) / scaling
            with self._autocast():
                pixels = self.vae.decode(chunk, return_dict=False)[0]
            images.extend(self.pipe.image_processor.postprocess(pixels, output_type="pil"))
        return images

    def sample_latents(self, prompts: Sequence[str], seeds: Sequence[int], steps: int) -> torch.Tensor:
        """Sample one scaled latent per (prompt, seed), `sample_batch_size` per pipeline call;
        each latent depends only on its own seed."""
        height, width = self.config.resolution
        chunks: list[torch.Tensor] = []
        batch = self.config.sample_batch_size
        self.unet.eval()
        for start in range(0, len(prompts), batch):
            generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start : start + batch]]
            with torch.inference_mode(), self._autocast(), self._fp32_noise_predictions():
                result = self.pipe(prompt=list(prompts[start : start + batch]), height=height, width=width,
                                   num_inference_steps=steps, guidance_scale=self.config.guidance_scale,
                                   generator=generators, output_type="latent")
            chunks.append(result.images.float().clone())  # a normal tensor, usable by the fine-tune's autograd
        self._return_freed_host_memory(collect_cycles=self._collect_after_sampling)  # before the VAE decodes
        return torch.cat(chunks) if chunks else torch.empty(0)

    def _return_freed_host_memory(self, collect_cycles: bool = True) -> None:
        """On a CPU, hand what the last phase freed back to the OS: glibc keeps freed blocks in
        its heap, and measured at SD v1.4 size they are gigabytes (1.4 GiB after 10 samples, the
        gradients and optimizer state after a fine-tune) that the next phase would add its own
        peak to. A GPU's memory is the CUDA allocator's: nothing to do."""
        if not self.device.startswith("cuda"):
            return_freed_host_memory(collect_cycles)

    def generate_images(self, prompts: Sequence[str], seeds: Sequence[int], steps: int) -> list[Image.Image]:
        latents = self.sample_latents(prompts, seeds, steps)
        return self.decode_latents(latents) if latents.numel() else []

    def _trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Full: the whole UNet (fp32 master weights). LoRA: a fresh adapter on the attention
        projections (peft), the base weights frozen so they stay bit-identical."""
        self.unet.requires_grad_(self.config.finetune == "full")
        if self.config.finetune == "lora":
            from peft import LoraConfig

            lora = self.config.lora
            adapter = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                                 init_lora_weights="gaussian")
            self.unet.add_adapter(adapter, adapter_name=LORA_ADAPTER)
        params = [p for p in self.unet.parameters() if p.requires_grad]
        for p in params:
            # peft creates the adapter in its base layer's dtype (half under mixed precision); the
            # optimizer needs fp32 weights (diffusers' `cast_training_params`). A no-op in fp32.
            p.data = p.data.float()
        return params

    def fine_tune(self, instance_images: Sequence[Image.Image], instance_prompt: str, reference_latents: torch.Tensor,
                  reference_prompt: str, seed: int) -> list[float]:
        """DreamBooth-style fine-tuning of the UNet with the prior-preservation loss (Eq. 1).
        The Attribute Reference Set comes as the sampler's own (scaled) latents. With
        `reference_latents: reencoded` they are decoded and encoded again (DreamBooth's way: the
        VAE posterior of the class images, sampled every step), in `vae_batch_size` chunks."""
        cfg = self.config
        if cfg.train_steps == 0:
            return []
        generator = torch.Generator("cpu").manual_seed(seed)
        inst_mean, inst_std = self.encode_images(instance_images)
        inst_text = self.encode_prompt(instance_prompt)
        use_prior = cfg.prior_loss_weight > 0 and reference_latents.shape[0] > 0
        if use_prior:
            ref_latents, ref_std = reference_latents.to(self.device), None
            if cfg.reference_latents == "reencoded":
                ref_latents, ref_std = self.encode_images(self.decode_latents(ref_latents))
            ref_text = self.encode_prompt(reference_prompt)
        scaling = self.vae.config.scaling_factor
        num_timesteps = self.train_scheduler.config.num_train_timesteps
        prediction_type = self.train_scheduler.config.prediction_type

        params = self._trainable_parameters()
        # torch's autocast + GradScaler, not accelerate's Accelerator: that would also take over
        # device placement and distributed state, which the Ray actor owns.
        optimizer = _make_optimizer(params, cfg)
        scaler = torch.amp.GradScaler("cuda", enabled=cfg.mixed_precision == "fp16" and self.device.startswith("cuda"))
        losses: list[torch.Tensor] = []  # kept on the device: one host sync at the end, not one a step
        self.unet.train()
        b = cfg.train_batch_size
        for _ in range(cfg.train_steps):
            idx = torch.randint(0, inst_mean.shape[0], (b,), generator=generator)
            eps = torch.randn(inst_mean[idx].shape, generator=generator).to(self.device)
            parts, texts = [(inst_mean[idx] + inst_std[idx] * eps) * scaling], [inst_text.expand(b, -1, -1)]
            if use_prior:
                ridx = torch.randint(0, ref_latents.shape[0], (b,), generator=generator).to(ref_latents.device)
                if ref_std is None:
                    parts.append(ref_latents[ridx])
                else:
                    ref_eps = torch.randn(ref_latents[ridx].shape, generator=generator).to(self.device)
                    parts.append((ref_latents[ridx] + ref_std[ridx] * ref_eps) * scaling)
                texts.append(ref_text.expand(b, -1, -1))
            latents, text = torch.cat(parts), torch.cat(texts)
            noise = torch.randn(latents.shape, generator=generator).to(self.device, latents.dtype)
            timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=generator).to(self.device)
            noisy = self.train_scheduler.add_noise(latents, noise, timesteps)
            target = noise if prediction_type == "epsilon" else self.train_scheduler.get_velocity(latents, noise, timesteps)
            with self._autocast():
                pred = self.unet(noisy, timesteps, text).sample
            pred_prior = target_prior = None
            if use_prior:  # the instance half, then the reference half (the order of `parts`)
                (pred, pred_prior), (target, target_prior) = pred.chunk(2), target.chunk(2)
            terms = self.loss_fn(pred, target, pred_prior, target_prior)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms.total).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            losses.append(terms.total.detach())
        # Sampling needs neither gradients nor optimizer state: free them now, not at the next
        # identity (on a 24 GB GPU they are most of the fine-tune's footprint).
        optimizer.zero_grad(set_to_none=True)
        del optimizer, params
        self.unet.requires_grad_(False)
        self.unet.eval()
        self._return_freed_host_memory()
        return torch.stack(losses).tolist()

    def release_training_state(self) -> None:
        """After a failed identity: nothing of its fine-tune outlives the attempt. Its gradients
        (a full fine-tune: the UNet's size again), `requires_grad` flags and a LoRA adapter added
        before the failure (with its own gradients) would otherwise meet the retry."""
        self.unet.requires_grad_(False)
        for p in self.unet.parameters():
            p.grad = None
        if self._base_copy is None:  # LoRA: drop an adapter the failed attempt left (a no-op without)
            self.restore_base_weights()
        self.unet.eval()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        else:
            self._return_freed_host_memory()

    @torch.no_grad()
    def restore_base_weights(self) -> None:
        """Back to the base model: drop the LoRA adapter, or copy the base weights back."""
        if self._base_copy is not None:  # a full fine-tune
            self._base_copy.restore(self.unet)
        elif getattr(self.unet, "peft_config", None):
            # Removes the peft layers themselves (not only the adapter's weights), so the
            # UNet is again the base module tree with its untouched base weights.
            self.unet.unload_lora()

    # -- one identity ------------------------------------------------------------------------
    def reference_set(self, reference_prompt: str) -> tuple[torch.Tensor, bool]:
        """The Attribute Reference Set of `reference_prompt` as latents, from the base model, and
        whether it was reused. Its seeds derive from the run's seed and the prompt, not from the
        identity, so a reused set is exactly the one that would be sampled again."""
        cfg = self.config
        key = reference_set_key(cfg, reference_prompt)
        if self.references is not None and (stored := self.references.get(key)) is not None:
            return stored.to(self.device), True
        seeds = [stable_seed(cfg.seed, "reference", reference_prompt, i) for i in range(cfg.reference_images)]
        steps = cfg.reference_inference_steps or cfg.num_inference_steps
        latents = self.sample_latents([reference_prompt] * len(seeds), seeds, steps)
        if self.references is not None and latents.numel():
            self.references.put(key, latents)
        return latents, False

    @contextmanager
    def _phase(self, phase: str, timings: dict[str, float]) -> Iterator[None]:
        """Enter `phase` (tell the listeners, raise its injected fault) and time it into `timings`."""
        self.phase = phase
        for listener in self.phase_listeners:
            listener(phase)
        if self.fault is not None:
            self.fault(phase)
        start = time.perf_counter()
        yield
        timings[phase] = time.perf_counter() - start

    def process_identity(self, instance_images: Sequence[Image.Image], prompt: str, reference_prompt: str,
                         identity_seed: int, caption: str = "") -> IdentityOutput:
        """`caption`: the caption part of `prompt`, the part shortened where a sampling prompt
        would not fit the text encoder (empty: nothing is shortened)."""
        cfg = self.config
        timings: dict[str, float] = {}
        try:
            with self._phase("reference_set", timings):
                reference, reused = self.reference_set(reference_prompt)
                previews = self.decode_latents(reference[:REFERENCE_PREVIEWS]) if reference.numel() else []
            with self._phase("fine_tune", timings):
                train_seed = stable_seed(identity_seed, "train")
                losses = self.fine_tune(instance_images, prompt, reference, reference_prompt, train_seed)
            with self._phase("sample", timings):
                seeds = [stable_seed(identity_seed, "sample", i) for i in range(cfg.samples_per_identity)]
                prompts = self.fit_prompts(prompt, caption, seeds)
                images = self.generate_images(prompts, seeds, cfg.num_inference_steps)
        except BaseException as err:
            # Whatever happened, the next identity starts from the base model; but after a sticky
            # CUDA error every CUDA call fails and would only hide the first error.
            if not is_sticky_cuda_error(err):
                self.restore_base_weights()
            raise
        self.restore_base_weights()
        return IdentityOutput(images, seeds, prompts, previews, timings, losses, reused)


def memory_figures(device: str) -> str:
    """Peak memory so far, for failure messages: CUDA peak allocated of the device's total, or
    the process's peak RSS on CPU."""
    if device.startswith("cuda") and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        return f"peak allocated {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB of {total / 2**30:.1f} GiB"
    import resource

    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"


def _sibling(location: str, name: str) -> str:
    """`name` beside `location` (a local path or a URI): `<out>/reference_sets` -> `<out>/debug`."""
    parent, slash, _ = location.rstrip("/").rpartition("/")
    return f"{parent}/{name}" if slash else name


def _default_loader(model_id: str, device: str):
    from factory.models.loading import load_text_to_image

    return load_text_to_image(model_id, device, torch.float32)


class GenerationStage(RowStage):
    """Ray actor body for DI: loads the base pipeline once in `setup`, then processes identities."""

    name = "generate"
    reads = CAPTIONED_SCHEMA
    writes = GENERATION_FIELDS

    def __init__(self, config: GenerationConfig, output: OutputConfig, num_gpus: float = 0.0,
                 num_threads: int | None = None, fail_identities: Sequence[str] = (),
                 loader: Callable[[str, str], object] | None = None, reference_dir: str | None = None,
                 folders: ModelFolders | None = None, device: str | None = None) -> None:
        """`reference_dir`: `<build output>/reference_sets`; `device`: the torch device, for a
        caller driving the stage without Ray (a benchmark); by default the one Ray assigned."""
        self.config = config
        self.folders = folders or ModelFolders()
        # The build's output location, where the injected CUDA fault records that it fired.
        self.debug_dir = _sibling(reference_dir, "debug") if reference_dir else None
        self.reference_dir = reference_dir if config.reuse_reference_sets else None
        self.output = output
        self.num_gpus = num_gpus
        self.num_threads = num_threads
        self.device = device
        self.fail_identities = dict(fault_target(entry) for entry in fail_identities)
        self.loader = loader or _default_loader
        self.generator: DiversityInjectionGenerator | None = None
        self.model_loads = 0

    def resources(self) -> StageResources:
        c = self.config.concurrency
        # One identity queued per actor: each takes minutes, and a second one queued behind a busy
        # actor would wait there while an actor the pool scaled up to sits idle.
        return StageResources(1, c.min, c.max, float(self.num_threads or 1), self.num_gpus, tasks_in_flight=1)

    def setup(self) -> None:
        # The IIR token was checked against this model's tokenizer by the build's check phase
        # (factory.preflight), before any model loaded.
        if self.num_threads:
            # Same thread count on every actor keeps CPU results bit-reproducible across reruns.
            torch.set_num_threads(self.num_threads)
        device = self.device or actor_device(self.num_gpus)
        pipeline = self.loader(self.folders.open(self.config.base_model), device)
        self.model_loads += 1
        references = ReferenceSetStore(self.reference_dir) if self.reference_dir else None
        self.generator = DiversityInjectionGenerator(pipeline, self.config, device, references)

    def _fault(self, identity: str) -> Callable[[str], None] | None:
        """The injected failure of `identity` (generation.debug_fail_identities), raised as its
        first phase starts: `RuntimeError`, CUDA's `OutOfMemoryError` for `SOURCE/PID:oom`, or a
        sticky CUDA error for `SOURCE/PID:cuda`. That one fires once per build output (a marker
        under `<out>/debug/` records it), so the identity, retried by a restarted actor,
        succeeds; a stage given no output location raises it every time."""
        kind = self.fail_identities.get(identity)
        if kind is None:
            return None
        marker = None
        if kind == "cuda" and self.debug_dir:
            marker = resolve(self.debug_dir) / "injected_cuda_faults" / identity
            if marker.exists():
                return None

        def fail(phase: str) -> None:
            message = f"injected failure for {identity} in {phase} (generation.debug_fail_identities)"
            if kind == "oom":
                raise torch.cuda.OutOfMemoryError(f"CUDA out of memory: {message}")
            if kind == "cuda":
                if marker is not None:  # written first: the process may not outlive the error
                    marker.write_text(f"{message}\n")
                raise RuntimeError(f"CUDA error: an illegal memory access was encountered ({message})")
            raise RuntimeError(message)

        return fail

    def process_row(self, row: dict) -> dict:
        assert self.generator is not None, "call setup() first"
        generator = self.generator
        result, error, attempts = None, "", 0
        for attempts in range(1, self.config.max_retries + 2):
            try:
                generator.fault = self._fault(row["identity"])
                images = decode_images(row["image_bytes"])
                result = generator.process_identity(images, row["prompt"], row["reference_prompt"], row["seed"],
                                                    row["caption"])
                break
            except Exception as err:  # one identity's failure must not end the run ...
                if is_sticky_cuda_error(err):  # ... unless it broke this process's CUDA context
                    # Every later identity here would fail too: the actor ends (the Ray wrapper
                    # catches StickyCudaError), Ray starts a fresh one and retries the identity.
                    raise StickyCudaError(f"generation of identity {row['identity']}, phase {generator.phase}, "
                                          f"node {node_name()}: {err}") from err
                error = f"{type(err).__name__}: {err}"
                if isinstance(err, torch.cuda.OutOfMemoryError):
                    error = f"OutOfMemoryError: {err} (phase {generator.phase}; {memory_figures(generator.device)})"
            # Here, past the `except`, its traceback is gone and with it the failed attempt's frames
            # (activations, optimizer state): the retry starts from the memory of the first try.
            generator.release_training_state()
        out, ok = self.output, result is not None
        result = result or IdentityOutput([], [], [], [])  # a failed identity: nothing generated
        return {
            "model_loads": self.model_loads, "attempts": attempts, "generated_at": time.time(),
            "status": "ok" if ok else "failed", "error": "" if ok else error,
            "generated": [encode_image(i, out.image_size, out.image_format, out.jpeg_quality) for i in result.images],
            "sample_seeds": result.seeds, "sample_prompts": result.prompts,
            "reference_preview": [encode_image(i, out.image_size, "jpeg", 90) for i in result.reference_images],
            "timings": result.timings, "reference_reused": result.reference_reused,
        }
