"""Quick checks that the demo models learned what the factory relies on: the text-to-image
model paints the colour it is told to, and the captioner names the colour it sees. Used by the
model tests (`tests/test_models.py`) only, so it lives with them."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor

from core.settings.stages import CaptionConfig

# Rows and columns of the shirt in a 2:1 crop, as fractions (the procedural torso spans ~20-50 %
# of the height at the centre; we stay inside it whatever the person's scale and lane).
UPPER_BODY = ((0.28, 0.45), (0.35, 0.65))
_WEARING = re.compile(r"wearing (?:a |an )?([a-z]+)")


def upper_body_mean(images: np.ndarray) -> np.ndarray:
    """Mean RGB (0..1) of the upper-body region of `images` (N, H, W, 3 floats in 0..1)."""
    (top, bottom), (left, right) = UPPER_BODY
    height, width = images.shape[1:3]
    region = images[:, int(top * height) : int(bottom * height), int(left * width) : int(right * width)]
    return region.reshape(-1, 3).mean(axis=0)


def shirt_prompt(colour: str) -> str:
    """A description in the procedural dataset's words with only the shirt colour varying."""
    return CaptionConfig().reference_template.format(
        caption=f"a person with short black hair wearing a {colour} shirt, grey trousers and black shoes"
    )


@torch.no_grad()
def colour_response(
    pipeline: StableDiffusionPipeline,
    colours: Sequence[str] = ("red", "blue"),
    samples: int = 8,
    steps: int = 20,
    guidance_scale: float = 3.0,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Upper-body mean RGB of `samples` images per shirt colour, same seeds for every colour."""
    means = {}
    for colour in colours:
        generator = torch.Generator().manual_seed(seed)
        images = pipeline(
            [shirt_prompt(colour)] * samples, num_inference_steps=steps, guidance_scale=guidance_scale,
            generator=generator, output_type="np",
        ).images
        means[colour] = upper_body_mean(images)
    return means


def shirt_colour(caption: str) -> str | None:
    """The first colour word after "wearing" in a caption ("... wearing a red shirt" -> red)."""
    match = _WEARING.search(caption)
    return match.group(1) if match else None


@torch.no_grad()
def caption(
    model: Blip2ForConditionalGeneration, processor: Blip2Processor, images: Sequence[Image.Image],
    prompt: str | None = None, max_new_tokens: int = 40,
) -> list[str]:
    """Greedy captions as the caption stage makes them (prompt stripped from the output)."""
    prompt = CaptionConfig().prompt if prompt is None else prompt
    inputs = processor(images=list(images), text=[prompt] * len(images), return_tensors="pt", padding=True)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    texts = processor.batch_decode(output[:, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    return [t.strip() for t in texts]


def caption_accuracy(
    model: Blip2ForConditionalGeneration, processor: Blip2Processor, images: Sequence[Image.Image],
    upper_colours: Sequence[str],
) -> tuple[float, list[str]]:
    """Fraction of captions whose shirt colour is the true upper-body colour, and the captions."""
    captions = caption(model, processor, images)
    hits = [shirt_colour(c) == truth for c, truth in zip(captions, upper_colours, strict=True)]
    return sum(hits) / max(1, len(hits)), captions


def scene_prompt(scene_words: str) -> str:
    """One description with the world's words for a scene appended, as Diversity Injection does."""
    return shirt_prompt("red") + f", {scene_words}"


@torch.no_grad()
def scene_response(pipeline: StableDiffusionPipeline, probe, samples: int = 8, steps: int = 20,
                   guidance_scale: float = 3.0, seed: int = 0) -> dict[str, float]:
    """Domain -> share of `samples` images prompted with its scene words that `probe` (a
    `ConditionProbe` fitted on the world's own labels) reads as that domain; same seeds for all."""
    from core.datasets.synthetic import DOMAINS

    shares = {}
    for name in DOMAINS.names():
        generator = torch.Generator().manual_seed(seed)
        images = pipeline([scene_prompt(DOMAINS.get(name).scene_words)] * samples, num_inference_steps=steps,
                          guidance_scale=guidance_scale, generator=generator).images
        read = probe.predict(images)["domain"]
        shares[name] = sum(label == name for label in read) / len(read)
    return shares
