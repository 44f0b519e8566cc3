"""A tiny random Stable Diffusion XL built from configs, for tests and offline smoke runs.

SDXL's architecture at toy size: two CLIP text encoders (the second with a projection, whose pooled
output conditions the UNet), a UNet with "text_time" added embeddings (pooled text and six time ids),
no attention at the full latent resolution and several transformer layers per block below it, and a
VAE with SDXL's scaling factor. It runs in milliseconds; its pictures are noise.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from layout_retouch.tiny_models import SD_SCHEDULER, tiny_tokenizer

# The encoders' widths differ, as SDXL's do (768 and 1280): diffusers' single-file loader tells them apart by
# width. The UNet's cross-attention takes both side by side (80, unlike tiny SD's 32).
TEXT_WIDTH, TEXT_WIDTH_2 = 32, 48
POOLED_WIDTH = 32  # the second encoder's projection
TIME_EMBED = 8  # per time id; SDXL: 256
SDXL_VAE_SCALING = 0.13025  # SDXL's VAE config


def tiny_sdxl_unet(sample_size: int = 16) -> UNet2DConditionModel:
    """SDXL's block layout: down 1/1 without attention, 1/2 and 1/4 with; up mirrored. More transformer
    layers at 1/4 than at 1/2 (SDXL: 10 and 2; here 2 and 1)."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4), use_linear_projection=True,
        cross_attention_dim=TEXT_WIDTH + TEXT_WIDTH_2, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + POOLED_WIDTH, norm_num_groups=8,
    )


def _text_config(tokenizer, width: int, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)


def tiny_sdxl_components(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer, TEXT_WIDTH))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, TEXT_WIDTH_2, projection_dim=POOLED_WIDTH))
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=SDXL_VAE_SCALING, force_upcast=True,
    )
    return dict(unet=tiny_sdxl_unet(), vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=DDIMScheduler(**SD_SCHEDULER))


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed), force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sdxl_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random SDXL pipeline as a diffusers folder (safetensors) and return its path."""
    folder = Path(folder)
    tiny_sdxl_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    return folder
