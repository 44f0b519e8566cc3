"""Tiny random Stable Diffusion pipelines built from configs, for tests and offline smoke runs.

They have the architecture of SD 1.x (VAE, CLIP text encoder, UNet with cross-attention at several
resolutions, DDIM) at a size that runs in milliseconds, so every code path can be exercised with no
download. Their pictures are noise: the trained toy world is what shows the method working.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# Words the tiny tokenizer knows as single pieces; anything else splits into characters, which is
# how the tests get multi-piece tokens.
TINY_WORDS = ("a", "photo", "of", "sks", "dog", "star", "toy", "in", "the", "snow", "on", "beach", "at", "night")

SD_SCHEDULER = dict(  # ALGORITHM.md defaults: scaled-linear betas 0.00085-0.012, eta 0, no clipping
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000,
)


def tiny_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    chars = list(string.ascii_lowercase + string.digits + "<>-_.,'!")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges: list[tuple[str, str]] = []
    for word in TINY_WORDS:  # left-to-right merges that build each word as one piece
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tiny_unet(cross_attention_dim: int = 32, sample_size: int = 16) -> UNet2DConditionModel:
    # Attention at 1/1 and 1/2 of the latent resolution in both down and up paths, plus the mid block.
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_components(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=32,
    )
    return dict(
        unet=tiny_unet(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None, feature_extractor=None,
        image_encoder=None,
    )


def tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(**tiny_components(seed), requires_safety_checker=False)


def save_tiny_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random SD pipeline as a diffusers folder (safetensors) and return its path."""
    folder = Path(folder)
    tiny_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    return folder
