"""LPE: caption every image of a sequence with BLIP-2, merge the captions into one description,
and build the enhanced prompt P_E with the Identity Information Representer (IIR)."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Sequence

import torch
from PIL import Image

from core.device import actor_device
from factory.schema import CAPTION_FIELDS, SEQUENCE_SCHEMA
from core.settings.stages import CaptionConfig
from factory.models.shipping import ModelFolders
from factory.stages.base import RowStage, StageResources, decode_images

_PHRASE_SPLIT = re.compile(r",|;|\band\b|\bwith\b")


def clean_caption(text: str, prompt: str) -> str:
    """Drop an echoed prompt and 'Answer:' scaffolding, collapse white space, lowercase."""
    text = text.strip()
    if prompt and text.startswith(prompt):
        text = text[len(prompt) :]
    text = re.sub(r"^\s*(answer|a)\s*:\s*", "", text, flags=re.IGNORECASE)
    return " ".join(text.lower().split()).strip(" .,")


def merge_captions(captions: Sequence[str]) -> str:
    """Merge the captions of one sequence into one description.

    Captions of the same person from consecutive frames mostly agree; phrases (split at commas,
    'and', 'with') that at least half the captions contain are kept, in the order of the
    caption that holds most of them. Falls back to the most common caption.
    """
    captions = [c for c in captions if c]
    if not captions:
        return ""
    phrase_lists = [[p.strip() for p in _PHRASE_SPLIT.split(c) if p.strip()] for c in captions]
    counts = Counter(p for phrases in phrase_lists for p in set(phrases))
    quorum = (len(captions) + 1) // 2
    frequent = {p for p, n in counts.items() if n >= quorum}
    if not frequent:
        return Counter(captions).most_common(1)[0][0]
    # The caption covering most frequent phrases gives a natural word order.
    best = max(range(len(captions)), key=lambda i: (sum(p in frequent for p in phrase_lists[i]), -i))
    kept = [p for p in phrase_lists[best] if p in frequent]
    return ", ".join(kept) if kept else captions[best]


def build_prompts(caption: str, config: CaptionConfig) -> tuple[str, str]:
    """(P_E with the IIR token, the LPE prompt without it for the Attribute Reference Set).
    Without the IIR (`use_iir: false`) both are the reference prompt."""
    reference = config.reference_template.format(caption=caption).strip(" ,")
    if not config.use_iir:
        return reference, reference
    prompt = config.prompt_template.format(iir=config.iir_token, caption=caption).strip(" ,")
    return prompt, reference


class CaptionStage(RowStage):
    """BLIP-2 captioning actor: one model per actor, batches of identities."""

    name = "caption"
    reads = SEQUENCE_SCHEMA
    writes = CAPTION_FIELDS

    def __init__(self, config: CaptionConfig, num_gpus: float = 0.0, folders: ModelFolders | None = None) -> None:
        self.config = config
        self.num_gpus = num_gpus
        self.folders = folders or ModelFolders()
        self.model = self.processor = None

    def resources(self) -> StageResources:
        c = self.config
        # One identity per call: each identity is captioned in its own generate() call, so its
        # captions (and everything seeded from them) never depend on which rows shared a batch.
        # With no captioner loaded (`captions: category`) the actor asks for no GPU at all.
        gpus = 0.0 if c.captions == "category" else self.num_gpus
        return StageResources(1, c.concurrency.min, c.concurrency.max, 1.0, gpus)

    def setup(self) -> None:
        from factory.models.loading import load_captioner

        if self.config.captions == "category":
            return  # no captioner: every identity's caption is empty, its prompt the category's
        self.device = actor_device(self.num_gpus)
        self.model, self.processor = load_captioner(self.folders.open(self.config.model), self.device, self.config.dtype)

    @torch.inference_mode()
    def caption_images(self, images: Sequence[Image.Image]) -> list[str]:
        assert self.model is not None and self.processor is not None, "call setup() first"
        prompts = [self.config.prompt] * len(images)
        inputs = self.processor(images=list(images), text=prompts, return_tensors="pt", padding=True).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        output = self.model.generate(**inputs, max_new_tokens=self.config.max_new_tokens,
                                     num_beams=self.config.num_beams, do_sample=False)
        texts = self.processor.batch_decode(output, skip_special_tokens=True)
        return [clean_caption(t, self.config.prompt) for t in texts]

    def process_row(self, row: dict) -> dict:
        start = time.perf_counter()
        captions = [] if self.config.captions == "category" else self.caption_images(decode_images(row["image_bytes"]))
        caption = merge_captions(captions)
        prompt, reference = build_prompts(caption, self.config)
        return {"captions": captions, "caption": caption, "prompt": prompt, "reference_prompt": reference,
                "caption_seconds": time.perf_counter() - start}
