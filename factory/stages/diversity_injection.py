"""Diversity Injection: the paper's three generation phases for one identity, around one loaded
base text-to-image pipeline. For each identity the generator
  a. takes the Attribute Reference Set, sampled with the *base* weights from the LPE prompt
     without the IIR token (`factory.stages.reference_set`),
  b. fine-tunes the UNet on the identity's images (prompt with IIR) plus the reference set, with
     the Fine-Grain-Specific Prior Preservation Loss, Eq. 1 (`factory.stages.fine_tune`),
  c. samples N images with the IIR prompt plus seeded variations (`factory.stages.sample`),
  d. goes back to the base model (the fine-tune method's restore: never a reload of the model).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from PIL import Image

from core.device import is_sticky_cuda_error
from core.settings.stages import GenerationConfig
from factory.sequences import stable_seed
from factory.stages.diffusion import DiffusionModel
from factory.stages.fine_tune import DreamBooth
from factory.stages.fine_tune_methods import FINETUNE_METHODS
from factory.stages.reference_set import REFERENCE_PREVIEWS, ReferenceSetStore, attribute_reference_set
from factory.stages.sample import sample_images, sample_latents, sampling_prompts, sampling_scheduler


@dataclass
class IdentityOutput:
    images: list[Image.Image]
    seeds: list[int]
    prompts: list[str]
    reference_images: list[Image.Image]  # previews only: the set itself stays latents
    timings: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    reference_reused: bool = False  # the set came from the store (another identity's prompt)


class DiversityInjectionGenerator(DiffusionModel):
    """Per-identity fine-tune-and-sample around one loaded `StableDiffusionPipeline`.

    Memory plan beyond `DiffusionModel`'s: the Attribute Reference Set stays latents (only a few
    previews are decoded); the base UNet weights are kept as the fine-tune method needs them
    (full: in pinned host memory, in a local file when the UNet itself is in host memory; LoRA:
    not at all, the adapter is dropped); gradients and optimizer state are freed before
    sampling, and on a CPU handed back to the OS.
    """

    def __init__(self, pipeline, config: GenerationConfig, device: str = "cpu",
                 references: ReferenceSetStore | None = None) -> None:
        method = FINETUNE_METHODS.get(config.finetune)
        super().__init__(pipeline, config, device, half_precision_unet=method.frozen_base)
        self.references = references
        self.finetune_method = method(self)
        self.dreambooth = DreamBooth(self, self.finetune_method)
        self.pipe.scheduler = sampling_scheduler(pipeline.scheduler, config.scheduler)
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.phase = "setup"  # the phase running now, named when an identity fails
        # Called with the phase's name as each phase of an identity starts: observers (the cost
        # benchmark's meters) stay; `fault` is the current identity's injected failure, if any.
        self.phase_listeners: list[Callable[[str], None]] = []
        self.fault: Callable[[str], None] | None = None

    # -- the phases (instance methods, so that a benchmark can meter them on one instance) -------
    def reference_set(self, reference_prompt: str) -> tuple[torch.Tensor, bool]:
        return attribute_reference_set(self, self.references, reference_prompt)

    def fine_tune(self, instance_images: Sequence[Image.Image], instance_prompt: str, reference_latents: torch.Tensor,
                  reference_prompt: str, seed: int) -> list[float]:
        return self.dreambooth.train(instance_images, instance_prompt, reference_latents, reference_prompt, seed)

    def fit_prompts(self, prompt: str, caption: str, seeds: Sequence[int]) -> list[str]:
        return sampling_prompts(self, prompt, caption, seeds)

    def sample_latents(self, prompts: Sequence[str], seeds: Sequence[int], steps: int) -> torch.Tensor:
        return sample_latents(self, prompts, seeds, steps)

    def generate_images(self, prompts: Sequence[str], seeds: Sequence[int], steps: int) -> list[Image.Image]:
        return sample_images(self, prompts, seeds, steps)

    def restore_base_weights(self) -> None:
        """Back to the base model: the fine-tune method's restore."""
        self.finetune_method.restore()

    def release_training_state(self) -> None:
        """After a failed identity: nothing of its fine-tune outlives the attempt."""
        self.dreambooth.release_failed_try()

    # -- one identity ------------------------------------------------------------------------
    @contextmanager
    def _phase(self, phase: str, timings: dict[str, float]) -> Iterator[None]:
        """Enter `phase` (tell the listeners, raise its injected fault) and time it into `timings`."""
        self.phase = phase
        for listener in self.phase_listeners:
            listener(phase)
        if self.fault is not None:
            self.fault(phase)
        start = time.perf_counter()
        yield
        timings[phase] = time.perf_counter() - start

    def process_identity(self, instance_images: Sequence[Image.Image], prompt: str, reference_prompt: str,
                         identity_seed: int, caption: str = "") -> IdentityOutput:
        """`caption`: the caption part of `prompt`, the part shortened where a sampling prompt
        would not fit the text encoder (empty: nothing is shortened)."""
        cfg = self.config
        timings: dict[str, float] = {}
        try:
            with self._phase("reference_set", timings):
                reference, reused = self.reference_set(reference_prompt)
                previews = self.decode_latents(reference[:REFERENCE_PREVIEWS]) if reference.numel() else []
            with self._phase("fine_tune", timings):
                train_seed = stable_seed(identity_seed, "train")
                losses = self.fine_tune(instance_images, prompt, reference, reference_prompt, train_seed)
            with self._phase("sample", timings):
                seeds = [stable_seed(identity_seed, "sample", i) for i in range(cfg.samples_per_identity)]
                prompts = self.fit_prompts(prompt, caption, seeds)
                images = self.generate_images(prompts, seeds, cfg.num_inference_steps)
        except BaseException as err:
            # Whatever happened, the next identity starts from the base model; but after a sticky
            # CUDA error every CUDA call fails and would only hide the first error.
            if not is_sticky_cuda_error(err):
                self.restore_base_weights()
            raise
        self.restore_base_weights()
        return IdentityOutput(images, seeds, prompts, previews, timings, losses, reused)
