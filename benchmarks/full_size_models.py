"""The real architectures (SD v1.4, BLIP-2 OPT-2.7b) built from their published configs with
random weights: the same compute and memory as the hub checkpoints, for GPU benchmarks on
machines that cannot download them. Never used for generation. Used by the benchmarks only:
`identity_cost.py --random-init` and `gpu_check.py` (without `--tiny`)."""

from __future__ import annotations

from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from demo.tiny import SD_V1_SCHEDULE

# CompVis/stable-diffusion-v1-4: unet/config.json, vae/config.json, text_encoder/config.json
SD_V1_4_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD_V1_4_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
CLIP_VIT_L14_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
)
# Salesforce/blip2-opt-2.7b: ViT-g/14 vision tower, 12-layer Q-Former, OPT-2.7b.
BLIP2_VISION = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                    image_size=224, patch_size=14)
BLIP2_QFORMER = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     encoder_hidden_size=1408, cross_attention_frequency=2)
OPT_2_7B = dict(vocab_size=50272, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
                num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2560)


def random_stable_diffusion_v1_4(tokenizer: CLIPTokenizer) -> StableDiffusionPipeline:
    """SD v1.4's UNet, VAE and text encoder with random weights (any CLIP tokenizer whose ids
    fit the 49,408-token embedding will do for timing)."""
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**SD_V1_4_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_VIT_L14_TEXT)),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SD_V1_4_UNET),
        scheduler=PNDMScheduler.from_config(SD_V1_SCHEDULE),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
