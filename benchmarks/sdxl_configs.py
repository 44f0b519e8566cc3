"""Stable Diffusion XL 1.0 base's architecture, written out as configs, built with random weights (no download).

The values are those of the published SDXL base component configs (UNet 2.6B, VAE 84M, CLIP ViT-L/14 and
OpenCLIP ViT-bigG/14 text encoders, 123M and 695M). As in `sd15_configs.py`, random weights cost what
the real model costs, which is all a speed benchmark needs; the tokenizer is the project's small one.
Built directly in the requested dtype, so that half precision never holds an fp32 copy (14 GB).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from benchmarks.sd15_configs import DREAMBOOTH_NOISE, TEXT_ENCODER, VAE
from layout_retouch.tiny_models import SD_SCHEDULER, tiny_tokenizer

UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)
SDXL_VAE = dict(VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
TEXT_ENCODER_2 = dict(  # laion/CLIP-ViT-bigG-14's text tower, with its projection
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)


@contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def sdxl_unet(seed: int, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    with default_dtype(dtype):
        return UNet2DConditionModel(**UNET)


def sdxl_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusionXLPipeline:
    """SDXL's components with random weights, DDIM, the word-level tokenizer (its ids a subset of SDXL's)."""
    tokenizer = tiny_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with default_dtype(dtype):
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER, **ids))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2, **ids))
        vae = AutoencoderKL(**SDXL_VAE)
    pipe = StableDiffusionXLPipeline(
        unet=sdxl_unet(seed, dtype), vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tiny_tokenizer(), scheduler=DDIMScheduler(**SD_SCHEDULER),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dreambooth_unet(base: UNet2DConditionModel, seed: int) -> UNet2DConditionModel:
    """A second UNet with the base's weights slightly changed, as a fine-tune would leave them."""
    with default_dtype(base.dtype):
        unet = UNet2DConditionModel(**UNET)
    unet.load_state_dict(base.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * DREAMBOOTH_NOISE)
    return unet
