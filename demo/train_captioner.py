"""Captioner training of the demo's tiny BLIP-2: the caption stage's prompt and answers, with an
attribute probe that makes the visual tokens carry colours (the recipe as a whole: `demo.training`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from transformers import Blip2ForConditionalGeneration, Blip2Processor

from core.settings.stages import CaptionConfig
from demo.training import CameraJitter, Log, random_flip, train_loop


def train_captioner(
    model: Blip2ForConditionalGeneration,
    processor: Blip2Processor,
    images: Sequence[Image.Image],
    descriptions: Sequence[str],
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    prompt: str | None = None,
    attributes: Sequence[dict] | None = None,
    attribute_weight: float = 1.0,
    vision_lr_scale: float = 3.0,
    seed: int = 0,
    log: Log = print,
) -> None:
    """Teacher-forced LM loss on `descriptions` given the image, with and without `prompt`
    (default: the caption stage's prompt). Only description tokens and EOS are labelled.

    With `attributes` (the procedural dataset's per-image attribute rows) an auxiliary linear
    probe classifies each attribute from the query outputs the language model sees. From random
    initialisation the LM loss alone first settles on the language prior (every caption the same)
    and reads the image only slowly; the probe makes the visual features carry colours from the
    start. The probe is discarded: the saved model is a plain `Blip2ForConditionalGeneration`."""
    prompt = CaptionConfig().prompt if prompt is None else prompt
    tokenizer = processor.tokenizer
    pixel_values = processor(images=list(images), return_tensors="pt")["pixel_values"]
    image_ids = [model.config.image_token_index] * model.config.num_query_tokens
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    unique = sorted(set(descriptions))
    # Prompted answers follow "Answer:" after a space; unprompted captions start right after BOS.
    with_prompt = [tokenizer(" " + d, add_special_tokens=False).input_ids for d in unique]
    without_prompt = [tokenizer(d, add_special_tokens=False).input_ids for d in unique]
    text_index = [unique.index(d) for d in descriptions]

    def sequence(i: int, prompted: bool) -> tuple[list[int], list[int]]:
        context = image_ids + [bos] + (prompt_ids if prompted else [])
        target = (with_prompt if prompted else without_prompt)[text_index[i]] + [eos]
        return context + target, [-100] * len(context) + target

    probe = _AttributeProbe(attributes, model) if attributes is not None else None
    jitter = CameraJitter(processor.image_processor)

    def loss_of(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        prompted = (torch.rand(len(index), generator=generator) < 0.5).tolist()
        pairs = [sequence(int(i), p) for i, p in zip(index, prompted, strict=True)]
        input_ids = pad_sequence([torch.tensor(ids) for ids, _ in pairs], batch_first=True, padding_value=pad)
        labels = pad_sequence([torch.tensor(target) for _, target in pairs], batch_first=True, padding_value=-100)
        attention = pad_sequence([torch.ones(len(ids), dtype=torch.long) for ids, _ in pairs], batch_first=True)
        pixels = jitter(random_flip(pixel_values[index], generator), generator)
        features = model.get_image_features(pixel_values=pixels, return_dict=True)
        loss = model(
            pixel_values=None, mm_encoder_outputs={"image": features},
            input_ids=input_ids, attention_mask=attention, labels=labels,
        ).loss
        if probe is not None:
            loss = loss + attribute_weight * probe.loss(features.pooler_output, index)
        return loss

    params = [p for p in model.parameters() if p.requires_grad] + (list(probe.parameters()) if probe else [])
    language = {id(p) for p in model.language_model.parameters()}
    # The randomly initialised vision side needs a larger step than the language model.
    groups = [
        {"params": [p for p in params if id(p) not in language], "lr": lr * vision_lr_scale},
        {"params": [p for p in params if id(p) in language], "lr": lr},
    ]
    train_loop("captioner", [model], groups, loss_of, len(images), batch_size, steps, lr, seed, log, clip_grad=params)


class _AttributeProbe(torch.nn.Module):
    """Linear classifiers of every categorical attribute from the flattened query outputs."""

    KEYS = (
        "upper_color", "upper_pattern", "upper_color2", "lower_color", "lower_type", "shoe_color",
        "hair_color", "hair_length", "bag", "bag_color",
    )  # fmt: skip

    def __init__(self, rows: Sequence[dict], model: Blip2ForConditionalGeneration) -> None:
        """One head per attribute that every row has with at least two values."""
        super().__init__()
        features = model.config.num_query_tokens * model.config.text_config.hidden_size
        self.labels: dict[str, torch.Tensor] = {}
        self.heads = torch.nn.ModuleDict()
        for key in self.KEYS:
            values = sorted({str(row[key]) for row in rows}) if all(key in row for row in rows) else []
            if len(values) >= 2:
                self.labels[key] = torch.tensor([values.index(str(row[key])) for row in rows])
                self.heads[key] = torch.nn.Linear(features, len(values))

    def loss(self, query_embeddings: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        flat = query_embeddings.flatten(1)
        losses = [F.cross_entropy(head(flat), self.labels[key][index]) for key, head in self.heads.items()]
        return torch.stack(losses).mean()
