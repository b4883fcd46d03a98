"""The fine-tune (the paper's second phase): DreamBooth on one identity's images with the
Fine-Grain-Specific Prior Preservation Loss (Eq. 1) over its Attribute Reference Set. What
trains, and how the UNet goes back to the base model afterwards, is the fine-tune method that
`generation.finetune` names (`factory.stages.fine_tune_methods.FINETUNE_METHODS`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from core.settings.stages import GenerationConfig
from factory.stages.diffusion import DiffusionModel
from factory.stages.fine_tune_methods import FINETUNE_METHODS, FineTuneMethod


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


def make_optimizer(params: Iterable[torch.nn.Parameter], config: GenerationConfig) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' AdamW8bit) at the fine-tune method's learning rate."""
    lr = FINETUNE_METHODS.get(config.finetune).learning_rate(config)
    if config.use_8bit_adam:
        # No silent fallback to AdamW: the build's check phase has refused this setting where
        # bitsandbytes cannot load, so an ImportError here is a real fault of this node.
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr)


class DreamBooth:
    """The fine-tune of one identity on `model`, training what `method` makes trainable."""

    def __init__(self, model: DiffusionModel, method: FineTuneMethod) -> None:
        from diffusers import DDPMScheduler

        self.model, self.method = model, method
        # Training noise follows the model's own schedule (SD v1.4: scaled-linear DDPM betas):
        # made before a sampler replaces the pipeline's scheduler.
        self.train_scheduler = DDPMScheduler.from_config(model.pipe.scheduler.config)
        self.loss_fn = PriorPreservationLoss(model.config.prior_loss_weight)

    def train(self, instance_images: Sequence[Image.Image], instance_prompt: str, reference_latents: torch.Tensor,
              reference_prompt: str, seed: int) -> list[float]:
        """DreamBooth-style fine-tuning of the UNet with the prior-preservation loss (Eq. 1).
        The Attribute Reference Set comes as the sampler's own (scaled) latents. With
        `reference_latents: reencoded` they are decoded and encoded again (DreamBooth's way: the
        VAE posterior of the class images, sampled every step), in `vae_batch_size` chunks."""
        model, cfg = self.model, self.model.config
        if cfg.train_steps == 0:
            return []
        generator = torch.Generator("cpu").manual_seed(seed)
        inst_mean, inst_std = model.encode_images(instance_images)
        inst_text = model.encode_prompt(instance_prompt)
        use_prior = cfg.prior_loss_weight > 0 and reference_latents.shape[0] > 0
        if use_prior:
            ref_latents, ref_std = reference_latents.to(model.device), None
            if cfg.reference_latents == "reencoded":
                ref_latents, ref_std = model.encode_images(model.decode_latents(ref_latents))
            ref_text = model.encode_prompt(reference_prompt)
        scaling = model.vae.config.scaling_factor
        num_timesteps = self.train_scheduler.config.num_train_timesteps
        prediction_type = self.train_scheduler.config.prediction_type

        params = self.method.trainable_parameters()
        # torch's autocast + GradScaler, not accelerate's Accelerator: that would also take over
        # device placement and distributed state, which the Ray actor owns.
        optimizer = make_optimizer(params, cfg)
        scaler = torch.amp.GradScaler("cuda", enabled=cfg.mixed_precision == "fp16" and model.device.startswith("cuda"))
        losses: list[torch.Tensor] = []  # kept on the device: one host sync at the end, not one a step
        model.unet.train()
        b = cfg.train_batch_size
        for _ in range(cfg.train_steps):
            idx = torch.randint(0, inst_mean.shape[0], (b,), generator=generator)
            eps = torch.randn(inst_mean[idx].shape, generator=generator).to(model.device)
            parts, texts = [(inst_mean[idx] + inst_std[idx] * eps) * scaling], [inst_text.expand(b, -1, -1)]
            if use_prior:
                ridx = torch.randint(0, ref_latents.shape[0], (b,), generator=generator).to(ref_latents.device)
                if ref_std is None:
                    parts.append(ref_latents[ridx])
                else:
                    ref_eps = torch.randn(ref_latents[ridx].shape, generator=generator).to(model.device)
                    parts.append((ref_latents[ridx] + ref_std[ridx] * ref_eps) * scaling)
                texts.append(ref_text.expand(b, -1, -1))
            latents, text = torch.cat(parts), torch.cat(texts)
            noise = torch.randn(latents.shape, generator=generator).to(model.device, latents.dtype)
            timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=generator).to(model.device)
            noisy = self.train_scheduler.add_noise(latents, noise, timesteps)
            target = noise if prediction_type == "epsilon" else self.train_scheduler.get_velocity(latents, noise, timesteps)
            with model.autocast():
                pred = model.unet(noisy, timesteps, text).sample
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
        model.unet.requires_grad_(False)
        model.unet.eval()
        model.return_freed_host_memory()
        return torch.stack(losses).tolist()

    def release_failed_try(self) -> None:
        """After a failed identity: nothing of its fine-tune outlives the attempt. Its gradients
        (a full fine-tune: the UNet's size again), `requires_grad` flags and a LoRA adapter added
        before the failure (with its own gradients) would otherwise meet the retry."""
        unet = self.model.unet
        unet.requires_grad_(False)
        for p in unet.parameters():
            p.grad = None
        self.method.release_failed_try()
        unet.eval()
        if self.model.device.startswith("cuda"):
            torch.cuda.empty_cache()
        else:
            self.model.return_freed_host_memory()
