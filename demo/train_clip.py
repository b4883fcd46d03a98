"""Contrastive training of the demo's tiny CLIP, with the negatives the CLIP filter's texts name
(empty scenes, noise), so the filter's scores mean something (the recipe as a whole: `demo.training`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from core.datasets.synthetic import DOMAINS, CameraStyle, render_image, sequence_shots
from core.settings.stages import FilterConfig
from demo.training import CameraJitter, Log, padded_tokens, random_flip, train_loop, with_context


def empty_scenes(count: int, seed: int, domains: Sequence[str] = ("campus",)) -> list[Image.Image]:
    """Backgrounds of procedural cameras of `domains` (in turn) with nobody in them."""
    rng = np.random.default_rng(seed)
    scenes = []
    for k in range(count):
        camera = CameraStyle.sample(rng, DOMAINS.get(domains[k % len(domains)]))
        scenes.append(render_image(None, camera, sequence_shots(camera, rng, 1)[0], rng))
    return scenes


def blurry_noise(count: int, seed: int, size: tuple[int, int] = (128, 64)) -> list[Image.Image]:
    """Smooth random colour fields: "a blurry photo of nothing"."""
    rng = np.random.default_rng(seed)
    coarse = (rng.integers(0, 256, size=(4, 2, 3), dtype=np.uint8) for _ in range(count))
    return [Image.fromarray(c).resize((size[1], size[0]), Image.Resampling.BICUBIC) for c in coarse]


def train_clip(
    model: CLIPModel,
    processor: CLIPProcessor,
    images: Sequence[Image.Image],
    descriptions: Sequence[str],
    steps: int,
    batch_size: int = 48,
    lr: float = 1e-3,
    seed: int = 0,
    log: Log = print,
    contexts: Sequence[Sequence[str]] | None = None,
    domains: Sequence[str] = ("campus",),
) -> None:
    """Contrastive image/text training. Each batch's texts are its people's descriptions (with
    each of the image's `contexts` phrases, its view and scene words, half of the time:
    `with_context`) plus the CLIP filter's fixed texts (`clip_positive`, `clip_negatives`); a person
    image's target is split between its text and the positive text, an empty scene's (of
    `domains`) target is the first negative, a noise field's the second. One image per person is
    in a batch, so every person text has a single positive image."""
    filter_config = FilterConfig()
    fixed_texts = [filter_config.clip_positive, *filter_config.clip_negatives]
    count = min(256, len(images))
    negatives = [empty_scenes(count, seed, domains), blurry_noise(count, seed)][: len(filter_config.clip_negatives)]
    person_pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    negative_pixels = [processor(images=n, return_tensors="pt")["pixel_values"] for n in negatives]
    contexts = contexts if contexts is not None else [()] * len(descriptions)
    person_of = {d: k for k, d in enumerate(sorted(set(descriptions)))}
    per_negative = max(1, batch_size // 8)
    jitter = CameraJitter(processor.image_processor)

    def loss_of(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        seen: dict[int, int] = {}
        for i in index.tolist():
            seen.setdefault(person_of[descriptions[i]], i)
        people = torch.tensor(list(seen.values()))
        texts = [with_context(descriptions[i], contexts[i], generator) for i in seen.values()]
        tokens = padded_tokens(processor.tokenizer, [*texts, *fixed_texts])
        pixel_batches = [jitter(random_flip(person_pixels[people], generator), generator)]
        for pixels in negative_pixels:
            pixel_batches.append(pixels[torch.randint(0, len(pixels), (per_negative,), generator=generator)])
        logits = model(  # (images, texts)
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=torch.cat(pixel_batches),
        ).logits_per_image
        n_people = len(people)
        targets = torch.zeros_like(logits)
        targets[torch.arange(n_people), torch.arange(n_people)] = 0.5
        targets[:n_people, n_people] = 0.5  # clip_positive
        for k in range(len(negative_pixels)):
            start = n_people + k * per_negative
            targets[start : start + per_negative, n_people + 1 + k] = 1.0
        image_loss = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
        text_loss = F.cross_entropy(logits[:n_people, :n_people].T, torch.arange(n_people))
        return (image_loss + text_loss) / 2

    train_loop(
        "clip", [model], model.parameters(), loss_of, len(images), batch_size, steps, lr, seed, log, weight_decay=0.1
    )
