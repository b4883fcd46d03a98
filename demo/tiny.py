"""Tiny, seeded instances of the real model classes, built from configs (no downloads).

In the spirit of diffusers' `get_dummy_components`: each builder constructs the real
`UNet2DConditionModel`, `AutoencoderKL`, `CLIPTextModel`, `Blip2ForConditionalGeneration`,
`CLIPModel` ... from a small config under a fixed seed, so the factory's stages run the exact code
paths they run on `CompVis/stable-diffusion-v1-4`, `Salesforce/blip2-opt-2.7b` and
`openai/clip-vit-base-patch32`; only the sizes differ. Everything round-trips through
`save_pretrained` / `from_pretrained`.

Sizes are chosen for a 2-core CPU: the text-to-image model works at 64x32 pixels (H x W, the 2:1
person aspect) with a 4x-downsampling VAE (16x8x4 latents); BLIP-2 and CLIP see 32x32 images
(the real ones also squash the crop to a square).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    PNDMScheduler,
    SchedulerMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    GPT2Tokenizer,
    OPTConfig,
)

from demo.tokenizers import CLIP_MAX_LENGTH, train_clip_tokenizer, train_opt_tokenizer

Size = tuple[int, int]  # (height, width)

TEXT_TO_IMAGE_RESOLUTION: Size = (64, 32)
VAE_SCALE_FACTOR = 4  # 2 ** (len(vae block_out_channels) - 1)
LATENT_CHANNELS = 8  # SD uses 4 at 8x downsampling; 8 at 4x keeps colours with little training
VISION_IMAGE_SIZE = 32  # BLIP-2 / CLIP vision towers (square, like the real ones)

# OpenAI CLIP normalisation, used by SD's feature extractor, BLIP-2 and CLIP alike.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# The noise schedule of CompVis/stable-diffusion-v1-4 (scheduler/scheduler_config.json).
SD_V1_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "skip_prk_steps": True,
}
SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "pndm": PNDMScheduler,  # what SD v1.4 ships
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
}


def _layers(width: int) -> dict:
    """The transformer shape every tiny tower shares: 2 layers of 4 heads, MLP twice the width."""
    return {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 2, "num_attention_heads": 4}


def _clip_text_kwargs(tokenizer: CLIPTokenizer, hidden_size: int) -> dict:
    return {
        **_layers(hidden_size),
        "vocab_size": len(tokenizer),
        "projection_dim": hidden_size,
        "max_position_embeddings": CLIP_MAX_LENGTH,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def tiny_unet(
    seed: int = 0, cross_attention_dim: int = 64, resolution: Size = TEXT_TO_IMAGE_RESOLUTION
) -> UNet2DConditionModel:
    """SD v1's UNet layout shrunk: two resolution levels (32, 64 channels), cross-attention in
    the inner level, `sample_size` = the latent (H, W) so the pipeline's default size is 2:1."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=(resolution[0] // VAE_SCALE_FACTOR, resolution[1] // VAE_SCALE_FACTOR),
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    ).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """An `AutoencoderKL` with three levels (4x downsampling, 4 latent channels)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=TEXT_TO_IMAGE_RESOLUTION[0],
    ).eval()


def tiny_scheduler(kind: str = "pndm") -> SchedulerMixin:
    """The SD v1.4 noise schedule in the scheduler class named `kind` (pndm, ddim, ddpm)."""
    try:
        scheduler_cls = SCHEDULERS[kind]
    except KeyError:
        raise ValueError(f"unknown scheduler {kind!r}; choose from {sorted(SCHEDULERS)}") from None
    return scheduler_cls.from_config(SD_V1_SCHEDULE)


def tiny_stable_diffusion(
    seed: int = 0,
    tokenizer: CLIPTokenizer | None = None,
    scheduler: str = "pndm",
    resolution: Size = TEXT_TO_IMAGE_RESOLUTION,
) -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` assembled from the tiny components (no safety checker)."""
    tokenizer = tokenizer if tokenizer is not None else train_clip_tokenizer()
    torch.manual_seed(seed)  # a 2-layer text encoder over the tokenizer's vocabulary, 77 positions like SD v1
    text_encoder = CLIPTextModel(CLIPTextConfig(**_clip_text_kwargs(tokenizer, 64))).eval()
    return StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_unet(seed, cross_attention_dim=text_encoder.config.hidden_size, resolution=resolution),
        scheduler=tiny_scheduler(scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_blip2(
    seed: int = 0,
    tokenizer: GPT2Tokenizer | None = None,
    num_query_tokens: int = 8,
    image_size: int = 64,
    patch_size: int = 8,
) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """A `Blip2ForConditionalGeneration` (ViT 64x64/8 -> Q-Former -> OPT) and its `Blip2Processor`.

    Patches of 8x8 (each token sees a whole torso-sized patch) let the randomly initialised ViT
    learn colours in a few hundred steps; 4x4 patches learn markedly slower.

    As on the hub, the processor adds an `<image>` token to the OPT tokenizer and expands it
    `num_query_tokens` times in front of each prompt; the model config records that token's id
    (`image_token_index`) so the query outputs are scattered into those positions.
    """
    tokenizer = tokenizer if tokenizer is not None else train_opt_tokenizer()
    image_processor = BlipImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)
    image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token.content)
    width = 64
    text_config = OPTConfig(
        vocab_size=-(-len(tokenizer) // 8) * 8,  # rounded up to a multiple of 8
        hidden_size=width,
        word_embed_proj_dim=width,
        num_hidden_layers=2,
        ffn_dim=2 * width,
        num_attention_heads=4,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Blip2Config(
        vision_config={**_layers(width), "image_size": image_size, "patch_size": patch_size, "initializer_range": 0.02},
        qformer_config={
            **_layers(width),
            "encoder_hidden_size": width,
            "cross_attention_frequency": 1,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 128,
        },
        text_config=text_config.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=image_token_id,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    # transformers initialises the learned queries to zeros (a pretrained checkpoint overwrites
    # them); identical queries would stay identical under training, so give them distinct values.
    with torch.no_grad():
        model.query_tokens.normal_(0.0, config.initializer_range)
    model.generation_config.max_new_tokens = 40
    return model, processor


def tiny_clip(seed: int = 0, tokenizer: CLIPTokenizer | None = None) -> tuple[CLIPModel, CLIPProcessor]:
    """A dual-encoder `CLIPModel` (ViT 32x32/4, 2-layer text transformer) and its `CLIPProcessor`
    (images squashed to 32x32 without the centre crop, which would cut a 2:1 person's head and
    feet off)."""
    tokenizer = tokenizer if tokenizer is not None else train_clip_tokenizer()
    width = 64
    config = CLIPConfig(
        text_config=_clip_text_kwargs(tokenizer, width),
        vision_config={**_layers(width), "projection_dim": width, "image_size": VISION_IMAGE_SIZE, "patch_size": 4},
        projection_dim=width,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE},
        do_center_crop=False,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
