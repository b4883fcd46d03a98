"""Text-to-image training of the demo's tiny Stable Diffusion: the autoencoder alone, then the
UNet and the text encoder together (the recipe as a whole: `demo.training`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
from diffusers.training_utils import EMAModel
from PIL import Image

from core.settings.stages import CaptionConfig
from demo.tiny import SD_V1_SCHEDULE, TEXT_TO_IMAGE_RESOLUTION
from demo.training import Log, PedestrianCorpus, padded_tokens, random_flip, train_loop, with_context


def train_autoencoder(
    vae: AutoencoderKL,
    pixels: torch.Tensor,
    steps: int,
    batch_size: int = 16,
    lr: float = 2e-3,
    kl_weight: float = 1e-4,
    crop_rows: int | None = 32,
    seed: int = 0,
    log: Log = print,
) -> float:
    """Train `vae` to reconstruct `pixels` (N, 3, H, W in [-1, 1]); then set its
    `scaling_factor` to 1 / std of the latents (SD's 0.18215 plays the same role). Returns the
    reconstruction MSE on a sample of the training images.

    The autoencoder is convolutional, so it trains on random bands of `crop_rows` rows: the same
    number of updates at a fraction of the cost of whole images."""

    def loss_of(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = random_flip(pixels[index], generator)
        if crop_rows is not None and crop_rows < x.shape[2]:
            top = int(torch.randint(0, (x.shape[2] - crop_rows) // 8 + 1, (1,), generator=generator)) * 8
            x = x[:, :, top : top + crop_rows]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        kl = posterior.kl().mean() / x[0].numel()
        return F.l1_loss(recon, x) + F.mse_loss(recon, x) + kl_weight * kl

    train_loop("autoencoder", [vae], vae.parameters(), loss_of, len(pixels), batch_size, steps, lr, seed, log)
    with torch.no_grad():
        sample = pixels[:: max(1, len(pixels) // 256)]
        latents = vae.encode(sample).latent_dist.mean
        mse = F.mse_loss(vae.decode(latents).sample, sample).item()
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    log(f"[autoencoder] reconstruction MSE {mse:.4f}, latent scaling factor {vae.config.scaling_factor:.4f}")
    return mse


def train_text_to_image(
    pipeline: StableDiffusionPipeline,
    pixels: torch.Tensor,
    descriptions: Sequence[str],
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    caption_dropout: float = 0.1,
    ema_decay: float | None = 0.999,
    seed: int = 0,
    log: Log = print,
    contexts: Sequence[Sequence[str]] | None = None,
) -> None:
    """Train the pipeline's UNet and text encoder on (image, description) pairs with SD's
    epsilon-prediction loss. Half of the captions use the generation stage's reference template
    ("a photo of a person, <caption>") so the prompts the factory writes are in-distribution;
    each image's `contexts` phrases (its view and scene words) are appended, each half of the
    time (`with_context`), so the model follows variation phrases and draws every condition
    without them too."""
    vae, unet, text_encoder = pipeline.vae, pipeline.unet, pipeline.text_encoder
    template = CaptionConfig().reference_template
    with torch.no_grad():
        encoded = [vae.encode(chunk).latent_dist for chunk in pixels.split(256)]
    means = torch.cat([d.mean for d in encoded])
    stds = torch.cat([d.std for d in encoded])
    contexts = contexts if contexts is not None else [()] * len(descriptions)
    noise_scheduler = DDPMScheduler.from_config(SD_V1_SCHEDULE)

    def text_of(i: int, generator: torch.Generator) -> str:
        if float(torch.rand((), generator=generator)) < caption_dropout:
            return ""
        text = with_context(descriptions[i], contexts[i], generator)
        return template.format(caption=text) if float(torch.rand((), generator=generator)) < 0.5 else text

    def loss_of(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator))
        latents = latents * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        token_ids = padded_tokens(pipeline.tokenizer, [text_of(i, generator) for i in index.tolist()]).input_ids
        return F.mse_loss(unet(noisy, timesteps, text_encoder(token_ids)[0]).sample, noise)

    params = [*unet.parameters(), *text_encoder.parameters()]
    ema = EMAModel(unet.parameters(), decay=ema_decay, use_ema_warmup=True, power=3 / 4) if ema_decay else None
    train_loop(
        "text-to-image", [unet, text_encoder], params, loss_of, len(pixels), batch_size, steps, lr, seed, log,
        clip_grad=params, after_step=None if ema is None else lambda: ema.step(unet.parameters()),
    )
    if ema is not None:  # sample with the averaged weights: smoother than the last step's
        ema.copy_to(unet.parameters())


def pipeline_pixels(corpus: PedestrianCorpus) -> torch.Tensor:
    """The corpus at the text-to-image resolution: a float tensor in [-1, 1] of shape (N, 3, H, W)."""
    height, width = TEXT_TO_IMAGE_RESOLUTION
    arrays = [np.asarray(im.resize((width, height), Image.Resampling.BICUBIC), np.float32) for im in corpus.images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
