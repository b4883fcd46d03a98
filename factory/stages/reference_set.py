"""The Attribute Reference Set (the paper's first phase): images of the identity's described
attributes sampled by the *base* model from the LPE prompt without the IIR token, which the
fine-tune's prior term (Eq. 1) trains on. Kept as latents; identities whose reference prompt is
the same share one set, stored under the build's output (`ReferenceSetStore`)."""

from __future__ import annotations

import hashlib
import json

import torch

from core.settings.stages import GenerationConfig
from core.storage import resolve
from factory.sequences import stable_seed
from factory.stages.diffusion import DiffusionModel
from factory.stages.sample import sample_latents

REFERENCE_PREVIEWS = 4  # reference images decoded for the contact sheet; the rest stay latents


def reference_set_key(config: GenerationConfig, reference_prompt: str) -> str:
    """What an Attribute Reference Set depends on, hashed: identities whose LPE prompt without
    the IIR is the same share one set (model, prompt, sampler, steps, guidance, size, count, seed)."""
    fields = {
        "model": config.base_model, "prompt": reference_prompt, "scheduler": config.scheduler,
        "steps": config.reference_inference_steps or config.num_inference_steps, "guidance": config.guidance_scale,
        "resolution": list(config.resolution), "count": config.reference_images, "seed": config.seed,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


class ReferenceSetStore:
    """Attribute Reference Sets as latents under the output location (`DIR/reference_sets/`),
    one safetensors file per key, written atomically by the actor that sampled it, so another
    actor (or a rerun) with the same reference prompt loads it instead of sampling it again."""

    def __init__(self, root: str) -> None:
        self.root = resolve(root)

    def get(self, key: str) -> torch.Tensor | None:
        from safetensors.torch import load

        location = self.root / f"{key}.safetensors"
        try:
            return load(location.read_bytes())["latents"] if location.is_file() else None
        except Exception:  # a damaged file: sample the set again (and rewrite it)
            return None

    def put(self, key: str, latents: torch.Tensor) -> None:
        from safetensors.torch import save

        (self.root / f"{key}.safetensors").write_bytes(save({"latents": latents.detach().cpu().contiguous()}))


def attribute_reference_set(model: DiffusionModel, store: ReferenceSetStore | None, reference_prompt: str
                            ) -> tuple[torch.Tensor, bool]:
    """The Attribute Reference Set of `reference_prompt` as latents, from the base model (call it
    before the identity's fine-tune), and whether it was reused from `store`. Its seeds derive
    from the run's seed and the prompt, not from the identity, so a reused set is exactly the one
    that would be sampled again."""
    config = model.config
    key = reference_set_key(config, reference_prompt)
    if store is not None and (stored := store.get(key)) is not None:
        return stored.to(model.device), True
    seeds = [stable_seed(config.seed, "reference", reference_prompt, i) for i in range(config.reference_images)]
    steps = config.reference_inference_steps or config.num_inference_steps
    latents = sample_latents(model, [reference_prompt] * len(seeds), seeds, steps)
    if store is not None and latents.numel():
        store.put(key, latents)
    return latents, False
