"""Sampling (the paper's third phase): the samplers by name (`generation.scheduler`), the seeded
attribute variations appended to the IIR prompt (Diversity Injection), the prompt's token
budget, and the pipeline calls that turn (prompt, seed) pairs into latents and images. The
Attribute Reference Set (`factory.stages.reference_set`) is sampled the same way.

Importing this module imports no torch: the build's check phase (`factory.preflight`) asks
`SAMPLERS` which names exist before anything heavy loads, so torch is imported where it is used.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from core.registry import Registry
from core.settings.stages import VariationConfig

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from factory.stages.diffusion import DiffusionModel


class Sampler(Protocol):
    def scheduler(self, model_scheduler: Any) -> Any:
        """The diffusers scheduler to sample with, given the one the model ships."""


class ModelScheduler:
    """`model`: the sampler the model ships (SD v1.4: PNDM), as it is."""

    def scheduler(self, model_scheduler: Any) -> Any:
        return model_scheduler


@dataclass(frozen=True)
class DiffusersScheduler:
    """A diffusers scheduler class built `from_config` of the model's own scheduler, so the noise
    schedule (betas, timestep spacing) stays the model's."""

    class_name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def scheduler(self, model_scheduler: Any) -> Any:
        import diffusers

        return getattr(diffusers, self.class_name).from_config(model_scheduler.config, **self.options)


# Samplers of the reference set and the samples; fine-tuning always adds DDPM noise.
SAMPLERS: Registry[Sampler] = Registry("sampler", "generation.scheduler")
SAMPLERS.add("model", ModelScheduler())
SAMPLERS.add("pndm", DiffusersScheduler("PNDMScheduler"))
SAMPLERS.add("ddim", DiffusersScheduler("DDIMScheduler"))
SAMPLERS.add("dpmsolver++", DiffusersScheduler("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}))
SAMPLERS.add("unipc", DiffusersScheduler("UniPCMultistepScheduler"))
SAMPLERS.add("euler_a", DiffusersScheduler("EulerAncestralDiscreteScheduler"))


def sampling_scheduler(model_scheduler: Any, name: str) -> Any:
    """The scheduler of the sampler registered as `name`, configured like `model_scheduler`."""
    return SAMPLERS.get(name).scheduler(model_scheduler)


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


def sampling_prompts(model: DiffusionModel, prompt: str, caption: str, seeds: Sequence[int]) -> list[str]:
    """The sampling prompt of each seed: `prompt` plus its seeded variation phrases, the
    caption part shortened where the whole would not fit the text encoder (`fit_prompt`)."""
    limit = model.tokenizer.model_max_length
    return [fit_prompt(prompt, caption, variation_phrases(model.config.variations, random.Random(s)),
                       model.count_tokens, limit) for s in seeds]


def sample_latents(model: DiffusionModel, prompts: Sequence[str], seeds: Sequence[int], steps: int) -> torch.Tensor:
    """Sample one scaled latent per (prompt, seed), `sample_batch_size` per pipeline call;
    each latent depends only on its own seed."""
    import torch

    config = model.config
    height, width = config.resolution
    chunks: list[torch.Tensor] = []
    batch = config.sample_batch_size
    model.unet.eval()
    for start in range(0, len(prompts), batch):
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start : start + batch]]
        with torch.inference_mode(), model.autocast(), model.fp32_noise_predictions():
            result = model.pipe(prompt=list(prompts[start : start + batch]), height=height, width=width,
                                num_inference_steps=steps, guidance_scale=config.guidance_scale,
                                generator=generators, output_type="latent")
        chunks.append(result.images.float().clone())  # a normal tensor, usable by the fine-tune's autograd
    model.return_freed_host_memory(collect_cycles=model.collect_after_sampling)  # before the VAE decodes
    return torch.cat(chunks) if chunks else torch.empty(0)


def sample_images(model: DiffusionModel, prompts: Sequence[str], seeds: Sequence[int], steps: int) -> list[Image.Image]:
    latents = sample_latents(model, prompts, seeds, steps)
    return model.decode_latents(latents) if latents.numel() else []
