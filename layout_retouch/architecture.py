"""What differs between the base architectures the method runs on: SD 1.x/2.x and Stable Diffusion XL.

The one place that tells them apart. SDXL conditions its UNet on two CLIP text encoders (their
penultimate hidden states side by side), the second encoder's pooled projection and six "added time
ids" (original size, crop top-left, target size); its VAE overflows in fp16, and it has no attention at
the full latent resolution. Everything else (DDIM, CFG, the attention processor) is shared.

Layer rules per architecture (ALGORITHM.md, "Layer selection"), by place rather than block index:

- SD 1.x/2.x at 512 px (latent 64x64), 16 transformer blocks. Reference swap and blend: decoder
  self-attention at 1/2 and 1/1 of the latent (up 32x32 and 64x64, blocks 10-15: the paper's l >= 10).
  Cross-attention mask: 1/4 of the latent (16x16; blocks 4, 5, 7, 8, 9).
- SDXL at 1024 px (latent 128x128), 70 transformer blocks: down 1/2 (2 x 2), down 1/4 (2 x 10), mid 1/4
  (10), up 1/4 (3 x 10, blocks 34-63), up 1/2 (3 x 2, blocks 64-69); no attention at 1/1. The rule "1/2
  and 1/1" keeps the decoder's highest-resolution attention: the six self-attention layers of
  `up_blocks.1` at 64x64 (blocks 64-69), as many as SD 1.x's l >= 10, and what MasaCtrl's SDXL counting
  (70 layers) calls start layer 64. The mask keeps "1/4": the 32x32 cross-attention of down_blocks.2,
  the mid block and up_blocks.0 (60 layers, blocks 4-63). `ref_min_resolution=0.25` would add the 30
  decoder layers at 32x32 to the swap; it is a config value, not the default.

The rules happen to read the same for both (0.5 and 0.25); `LAYER_DEFAULTS` states them per
architecture so that a new backbone says its own, and `tests/test_sdxl.py` pins the layers they select.
The pipeline's default config comes from here; the CLI builds its config before it knows the model, from
LayoutRetouchConfig's defaults, which a test keeps equal to every architecture's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layout_retouch.config import LayoutRetouchConfig


@dataclass(frozen=True)
class Architecture:
    name: str  # "sd" (1.x / 2.x) or "sdxl"
    label: str  # for messages
    text_encoders: int  # 1, or 2 (CLIP-L and OpenCLIP bigG side by side)
    added_conditioning: bool  # the UNet takes added_cond_kwargs: pooled text embedding and time ids
    upcast_vae: bool  # run an fp16 VAE in fp32 when its config says force_upcast (as diffusers' SDXL does)


SD = Architecture("sd", "SD 1.x/2.x", text_encoders=1, added_conditioning=False, upcast_vae=False)
SDXL = Architecture("sdxl", "SDXL", text_encoders=2, added_conditioning=True, upcast_vae=True)
ARCHITECTURES = {a.name: a for a in (SD, SDXL)}

# The paper's layer rules mapped onto each architecture (module docstring); the values of LayoutRetouchConfig.
LAYER_DEFAULTS: dict[str, dict[str, float]] = {
    "sd": dict(ref_min_resolution=0.5, mask_attention_resolution=0.25),
    "sdxl": dict(ref_min_resolution=0.5, mask_attention_resolution=0.25),
}


def architecture_of(unet) -> Architecture:
    """SDXL's UNet embeds the pooled text and the time ids ("text_time"); SD 1.x/2.x's embed neither."""
    return SDXL if unet.config.get("addition_embed_type") == "text_time" else SD


def default_config(architecture: Architecture, **overrides) -> LayoutRetouchConfig:
    """The method's defaults on `architecture` (the layer rules above), with `overrides`."""
    return LayoutRetouchConfig(**{**LAYER_DEFAULTS[architecture.name], **overrides})


def sdxl_time_ids(size: tuple[int, int], dtype: torch.dtype, device=None) -> torch.Tensor:
    """(1, 6) added time ids for an image generated at `size` = (height, width): original size, crop
    top-left (0, 0), target size, as diffusers' SDXL pipeline makes them by default."""
    height, width = size
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
