"""The loaded text-to-image model as the three generation phases use it (reference set,
fine-tune, sample): one `StableDiffusionPipeline` with its parts frozen and placed for the
memory plan, and the building blocks every phase shares (prompt embeddings, VAE encode and
decode in chunks, autocast, handing freed host memory back)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from PIL import Image

from core.device import return_freed_host_memory
from core.settings.stages import GenerationConfig

MIXED_PRECISION_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_LARGE_UNET_BYTES = 2**30  # SD v1.4's UNet: 3.4 GB in fp32; the demo's: a few MB


class DiffusionModel:
    """One loaded `StableDiffusionPipeline` and its shared building blocks.

    Memory plan (the paper recipe on one 24 GB GPU): the frozen VAE runs in the mixed-precision
    dtype, and so does the frozen UNet of a fine-tune that never writes its base weights
    (`half_precision_unet`: LoRA, whose adapter stays fp32); the VAE encodes and decodes
    `vae_batch_size` images at a time. The text encoder, the latents and the sampler stay fp32.
    """

    def __init__(self, pipeline, config: GenerationConfig, device: str = "cpu",
                 half_precision_unet: bool = False) -> None:
        self.pipe = pipeline
        self.config = config
        self.device = device
        self.pipe.set_progress_bar_config(disable=True)
        self.unet = pipeline.unet.requires_grad_(False)  # trainable only inside a fine-tune
        frozen_dtype = MIXED_PRECISION_DTYPES.get(config.mixed_precision)
        self.vae = pipeline.vae.requires_grad_(False)
        # The text encoder keeps fp32 weights (it runs under autocast like the UNet): the
        # pipeline creates its latents in the prompt embeddings' dtype, the text encoder's, and a
        # bf16 encoder would make the sampler integrate in bf16 (an 8-bit mantissa).
        self.text_encoder = pipeline.text_encoder.requires_grad_(False)
        if frozen_dtype is not None:
            self.vae.to(dtype=frozen_dtype)
            if half_precision_unet:
                # Base weights never written stay in the half dtype for good (autocast would
                # otherwise re-cast all 860M of them at every forward).
                self.unet.to(dtype=frozen_dtype)
        self.tokenizer = pipeline.tokenizer
        # After sampling, a full garbage-collector pass (~0.35 s) pays only where what cycles hold
        # is large: at SD v1.4 size skipping it left sample/vae_decode 0.7 GiB higher (7.07 GiB);
        # with the demo's tiny UNet it is a quarter of each short sampling call.
        unet_bytes = sum(p.numel() * p.element_size() for p in self.unet.parameters())
        self.collect_after_sampling = unet_bytes >= _LARGE_UNET_BYTES

    def autocast(self):
        dtype = MIXED_PRECISION_DTYPES.get(self.config.mixed_precision)  # None: "no"
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        return nullcontext() if dtype is None else torch.autocast(device_type=device_type, dtype=dtype)

    @contextmanager
    def fp32_noise_predictions(self) -> Iterator[None]:
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
        with self.autocast():
            return self.text_encoder(tokens.input_ids.to(self.device))[0].float()

    def count_tokens(self, prompt: str) -> int:
        """Tokens of `prompt` as the text encoder would see them untruncated (with BOS and EOS);
        not verbose: counting a long prompt is not feeding it to the model."""
        return len(self.tokenizer(prompt, truncation=False, verbose=False).input_ids)

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
            with self.autocast():
                pixels = self.vae.decode(chunk, return_dict=False)[0]
            images.extend(self.pipe.image_processor.postprocess(pixels, output_type="pil"))
        return images

    def return_freed_host_memory(self, collect_cycles: bool = True) -> None:
        """On a CPU, hand what the last phase freed back to the OS: glibc keeps freed blocks in
        its heap, and measured at SD v1.4 size they are gigabytes (1.4 GiB after 10 samples, the
        gradients and optimizer state after a fine-tune) that the next phase would add its own
        peak to. A GPU's memory is the CUDA allocator's: nothing to do."""
        if not self.device.startswith("cuda"):
            return_freed_host_memory(collect_cycles)
