"""Contrastive training of the demo's tiny CLIP, with the negatives the CLIP filter's texts name
(empty scenes, noise), so the filter's scores mean something (the recipe as a whole: `demo.training`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from core.datasets.synthetic import CameraStyle, render_image, sequence_shots
from core.settings.stages import FilterConfig
from demo.training import CameraJitter, Log, padded_tokens, random_flip, train_loop


def empty_scenes(count: int, seed: int) -> list[Image.Image]:
    """Backgrounds of the procedural cameras with nobody in them."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(count):
        camera = CameraStyle.sample(rng)
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
) -> None:
    """Contrastive image/text training. Each batch's texts are its people's descriptions plus
    the CLIP filter's fixed texts (`clip_positive`, `clip_negatives`); a person image's target is
    split between its description and the positive text, an empty scene's target is the first
    negative, a noise field's the second. Texts are matched back to images only for descriptions."""
    filter_config = FilterConfig()
    fixed_texts = [filter_config.clip_positive, *filter_config.clip_negatives]
    count = min(256, len(images))
    negatives = [empty_scenes(count, seed), blurry_noise(count, seed)][: len(filter_config.clip_negatives)]
    person_pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    negative_pixels = [processor(images=n, return_tensors="pt")["pixel_values"] for n in negatives]
    unique = sorted(set(descriptions))
    text_tokens = padded_tokens(processor.tokenizer, [*unique, *fixed_texts])
    text_index = torch.tensor([unique.index(d) for d in descriptions])
    fixed_rows = torch.arange(len(unique), len(unique) + len(fixed_texts))
    per_negative = max(1, batch_size // 8)
    jitter = CameraJitter(processor.image_processor)

    def loss_of(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # one image per description in the batch, so every text has a single positive image
        seen: dict[int, int] = {}
        for i in index.tolist():
            seen.setdefault(int(text_index[i]), i)
        people = torch.tensor(list(seen.values()))
        rows = torch.cat([torch.tensor(list(seen.keys())), fixed_rows])
        pixel_batches = [jitter(random_flip(person_pixels[people], generator), generator)]
        for pixels in negative_pixels:
            pixel_batches.append(pixels[torch.randint(0, len(pixels), (per_negative,), generator=generator)])
        logits = model(  # (images, texts)
            input_ids=text_tokens.input_ids[rows], attention_mask=text_tokens.attention_mask[rows],
            pixel_values=torch.cat(pixel_batches),
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
