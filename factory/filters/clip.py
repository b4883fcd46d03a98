"""The `clip` filter: CLIP's zero-shot probability of the "person" prompt against negative prompts.

torch and transformers load when an actor sets the filter up: the check phase imports this
module for the registry alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from core.settings.stages import FilterConfig
from factory.filters.base import FILTERS, ImageFilter
from factory.stages.base import decode_images


@FILTERS.register("clip")
class ClipFilter(ImageFilter):
    score_range = (0.0, 1.0)  # a probability
    model_keys = ("clip_model",)

    @classmethod
    def config_problems(cls, config: FilterConfig) -> Iterable[tuple[str, Any, str]]:
        if not config.clip_negatives:
            yield ("filter.clip_negatives", config.clip_negatives, "the CLIP score is a softmax over the positive and "
                   "the negative prompts: with none every image scores 1.0")

    def setup(self, device: str) -> None:
        import torch

        from factory.models.loading import load_clip

        super().setup(device)
        self.model, self.processor = load_clip(self.config.clip_model, device, torch.float32)
        texts = [self.config.clip_positive, *self.config.clip_negatives]
        self.text_tokens = dict(self.processor(text=texts, return_tensors="pt", padding=True).to(device))

    def score_images(self, row: Mapping) -> list[float]:
        import torch

        with torch.inference_mode():
            pixels = self.processor(images=decode_images(row["generated"]), return_tensors="pt").to(self.device)
            # Not transformers' zero-shot-image-classification pipeline: it tokenizes the prompts
            # again on every call and returns label dicts sorted by score; here they are tokenized
            # once per actor. The model's own forward gives image-text logits (scaled cosine): stable
            # across transformers versions, unlike the return type of get_text_features / get_image_features.
            logits = self.model(**self.text_tokens, pixel_values=pixels["pixel_values"]).logits_per_image
            return logits.softmax(dim=1)[:, 0].cpu().tolist()
