"""Stable Diffusion 1.5's architecture, written out as configs, built with random weights (no download).

The values are those of the published SD 1.5 component configs (UNet 860M, VAE 84M, CLIP ViT-L/14
text encoder 123M). Random weights make pictures of noise but cost exactly what the real model
costs, which is all a speed benchmark needs. The tokenizer is the project's small word-level CLIP
tokenizer (`tiny_tokenizer`): its ids are a subset of SD's 49408, so the text encoder is the full one.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from layout_retouch.tiny_models import SD_SCHEDULER, tiny_tokenizer

UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu",
    center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
    norm_eps=1e-5,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), act_fn="silu", norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
TEXT_ENCODER = dict(  # openai/clip-vit-large-patch14's text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
# Scale of the random weights' perturbation that makes the DreamBooth UNet differ from the base.
DREAMBOOTH_NOISE = 1e-3


def sd15_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET)


def dreambooth_unet(base: UNet2DConditionModel, seed: int) -> UNet2DConditionModel:
    """A second UNet with the base's weights slightly changed, as a fine-tune would leave them."""
    unet = UNet2DConditionModel(**UNET)
    unet.load_state_dict(base.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * DREAMBOOTH_NOISE)
    return unet


def sd15_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD 1.5's components with random weights, DDIM, the word-level tokenizer."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER, bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(**VAE)
    pipe = StableDiffusionPipeline(unet=sd15_unet(seed), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
