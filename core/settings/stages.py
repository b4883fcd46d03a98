"""Config sections of the generation pipeline stages (sequences, captioning, generation, filter,
output, ray). Composed with the trainer sections into `core.settings.run.RunConfig`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.config import ImageSize, StrictModel, UriStr
from core.settings.reid import ReidTrainConfig

class Concurrency(StrictModel):
    """Actor-pool size handed to Ray Data: it autoscales between `min` and `max` actors."""

    min: int = Field(1, ge=1)
    max: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Concurrency:
        if self.max < self.min:
            raise ValueError(f"concurrency.max ({self.max}) < concurrency.min ({self.min})")
        return self


class SequenceConfig(StrictModel):
    """How each identity's input sequence is picked: the paper feeds consecutive images of one
    camera; we take the camera with the most images and its frames in order."""

    max_images: int = Field(8, ge=1, description="cap on the input sequence length")
    min_images: int = Field(1, ge=1, description="identities with fewer usable images are skipped and reported")
    max_identities: int | None = Field(None, ge=1, description="cap on identities per run (demos, smoke tests)")
    strategy: Literal["longest_camera_run", "all_cameras"] = "longest_camera_run"


class CaptionConfig(StrictModel):
    """LPE captioning with BLIP-2; the prompt steers it towards person attributes."""

    model: str = "Salesforce/blip2-opt-2.7b"
    prompt: str = "Question: Describe the person's clothing, carried items and action in detail. Answer:"
    max_new_tokens: int = Field(40, ge=1)
    num_beams: int = Field(1, ge=1)
    concurrency: Concurrency = Concurrency()
    num_gpus: float = Field(1.0, ge=0, description="GPUs per captioning actor when the cluster has GPUs")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    iir_token: str = Field("zwx", min_length=1, description="Identity Information Representer")
    prompt_template: str = "a photo of {iir} person, {caption}"
    reference_template: str = "a photo of a person, {caption}"
    # Ablations of the paper's Table 6 (eval.experiment runs them); the defaults are the method.
    captions: Literal["lpe", "category"] = Field(
        "lpe", description="lpe: BLIP-2 captions merged per identity (the paper); category: no captioner, "
        "the prompts carry the category only ('a photo of zwx person')")
    use_iir: bool = Field(
        True, description="false: fine-tune and sample on the prompt without the IIR token (the reference prompt)")


class VariationConfig(StrictModel):
    """Diversity Injection at sampling time: each generated image draws, per category and with
    probability `probability`, one phrase to append to the IIR prompt. Seeded per image."""

    probability: float = Field(0.5, ge=0, le=1)
    clothing: list[str] = ["wearing a jacket", "wearing a t-shirt", "wearing a coat", "wearing shorts"]
    carried_items: list[str] = ["carrying a backpack", "carrying a handbag", "holding a phone"]
    action: list[str] = ["walking", "standing", "running", "riding a bicycle"]
    camera_pose: list[str] = ["seen from the front", "seen from behind", "seen from the side"]
    scene: list[str] = ["on a city street", "on a campus", "in an airport hall", "in a park"]


class LoraSettings(StrictModel):
    """`generation.finetune: lora`: a peft LoRA adapter on the UNet's attention projections,
    trained per identity and dropped afterwards (the base weights are never written)."""

    rank: int = Field(16, ge=1)
    alpha: float = Field(16.0, gt=0)
    target_modules: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0"], min_length=1)
    learning_rate: float = Field(1e-4, gt=0, description="LoRA's own rate (adapters need far more than 2e-6)")


class GenerationConfig(StrictModel):
    """Per-identity DreamBooth fine-tune with the Fine-Grain-Specific Prior Preservation Loss."""

    base_model: str = "CompVis/stable-diffusion-v1-4"
    resolution: ImageSize = (512, 512)
    reference_images: int = Field(200, ge=0, description="size of the Attribute Reference Set")
    train_steps: int = Field(1000, ge=0)
    learning_rate: float = Field(2e-6, gt=0)
    prior_loss_weight: float = Field(1.0, ge=0, description="lambda of Eq. 1; 0 = plain DreamBooth")
    train_batch_size: int = Field(1, ge=1)
    samples_per_identity: int = Field(150, ge=1)
    num_inference_steps: int = Field(50, ge=1)
    reference_inference_steps: int | None = Field(None, ge=1, description="defaults to num_inference_steps")
    guidance_scale: float = Field(7.5, ge=0)
    scheduler: str = Field(
        "model", description="sampler for the reference set and the samples, a name registered in "
        "factory.stages.sample.SAMPLERS: 'model' keeps the one the model ships (SD v1.4: PNDM); pndm, ddim, "
        "dpmsolver++, unipc, euler_a; fine-tuning always adds DDPM noise")
    sample_batch_size: int = Field(10, ge=1)
    vae_batch_size: int = Field(8, ge=1, description="images per VAE encode/decode call (bounds VAE activation memory)")
    reference_latents: Literal["reencoded", "sampled"] = Field(
        "reencoded", description="what the prior term trains on: the VAE posterior of the decoded reference "
        "images, sampled per step (DreamBooth's class images; decoded and encoded in vae_batch_size chunks), "
        "or the sampler's own latents (no VAE pass; measured weaker identity consistency on the demo)")
    reuse_reference_sets: bool = Field(
        True, description="identities with the same reference prompt share one Attribute Reference Set, "
        "stored as latents under DIR/reference_sets/")
    finetune: str = Field(
        "full", description="a name registered in factory.stages.fine_tune.FINETUNE_METHODS: full: the paper's "
        "whole-UNet fine-tune; lora: peft adapter")
    lora: LoraSettings = LoraSettings()
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = Field(False, description="bitsandbytes' AdamW8bit; the check phase refuses it where bitsandbytes cannot load")
    max_grad_norm: float = Field(1.0, gt=0)
    variations: VariationConfig = VariationConfig()
    concurrency: Concurrency = Concurrency()
    num_gpus: float = Field(1.0, ge=0, description="GPUs per generation actor when the cluster has GPUs")
    max_retries: int = Field(1, ge=0, description="retries of a failing identity before it is recorded as failed")
    max_failed_identities: int = Field(
        0, ge=0, description="failed identities a build tolerates and still exits 0 (very large runs); more -> exit 1")
    circuit_breaker: int = Field(
        3, ge=0, description="stop the build at once when the first N identities of a run all fail with the same "
        "error class (a systematic failure); 0 = never stop early")
    seed: int = 0
    replay_from: UriStr | None = Field(
        None, description="a finished build (folder or URI) of the same sources, sequences, captions and "
        "generation settings: its staged samples are filtered again instead of generated (no diffusion model "
        "loads). A filter-only variant of a build; eval.experiment uses it for the filter ablations")
    debug_fail_identities: list[str] = Field(
        [], description="fault injection: identities ('source/pid') whose generation always raises "
        "(RuntimeError; 'source/pid:oom' raises CUDA's OutOfMemoryError; 'source/pid:cuda' a sticky CUDA error, "
        "once per build output, which ends the actor and is retried by a fresh one)")


def fault_target(entry: str) -> tuple[str, str]:
    """`generation.debug_fail_identities` entry -> (identity, kind): `synthetic/3` ->
    ("synthetic/3", "error"), `synthetic/3:oom` -> ("synthetic/3", "oom")."""
    identity, _, kind = entry.partition(":")
    return identity, kind or "error"


class FilterConfig(StrictModel):
    """Which filter scores generated images, and the threshold that keeps them."""

    kind: str = Field("reid", description="a registered filter (factory.filters.FILTERS: reid, cctf, clip, or one "
                      "a module registers); the build's check phase refuses a name not registered")
    threshold: float = 0.5
    reid_checkpoints: dict[str, UriStr] = Field(
        {}, description="source name -> filter-model folder or URI (with filter_model.json, as a build writes "
        "under DIR/filter_models/<source>); sources not listed get a model trained by the build")
    reid: ReidTrainConfig = ReidTrainConfig()
    clip_model: str = "openai/clip-vit-base-patch32"
    clip_positive: str = "a photo of a person"
    clip_negatives: list[str] = ["a photo of an empty street", "a blurry photo of nothing"]
    concurrency: Concurrency = Concurrency()
    num_gpus: float = Field(0.25, ge=0)


class OutputConfig(StrictModel):
    dir: UriStr = Field("outputs/demo", description="output folder or URI (s3://, gs://, ...); --out overrides")
    image_size: ImageSize = (256, 128)
    image_format: Literal["jpeg", "png"] = "jpeg"
    jpeg_quality: int = Field(95, ge=1, le=100)
    rows_per_shard: int = Field(4096, ge=1)
    contact_sheet_identities: int = Field(4, ge=0)
