"""Tiny base models and personalizations of every kind, written to disk as users would have them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file

from layout_retouch.tiny_models import save_tiny_pipeline, tiny_components


def make_base(folder: Path) -> Path:
    return save_tiny_pipeline(folder, seed=0)


def make_dreambooth(folder: Path, text_encoder: bool = True) -> Path:
    """A DreamBooth result: the base with a differently seeded UNet (and text encoder)."""
    base = tiny_components(seed=0)
    tuned = tiny_components(seed=1)
    base["unet"] = tuned["unet"]
    if text_encoder:
        base["text_encoder"] = tuned["text_encoder"]
    StableDiffusionPipeline(**base, requires_safety_checker=False).save_pretrained(folder)
    return folder


def make_textual_inversion(path: Path, token: str = "<cat-toy>", vectors: int = 2) -> Path:
    torch.manual_seed(3)
    save_file({token: torch.randn(vectors, 32)}, str(path))
    return path


def make_lora(folder: Path) -> Path:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = tiny_components(seed=0)["unet"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = get_peft_model_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder


def make_custom_diffusion(folder: Path, token: str = "<new1>") -> Path:
    unet = tiny_components(seed=0)["unet"]
    torch.manual_seed(4)
    state = {}
    for name, param in unet.named_parameters():
        if ".attn2.to_k." in name or ".attn2.to_v." in name:
            layer, proj = name.rsplit(".", 2)[0], name.rsplit(".", 2)[1]
            state[f"{layer}.processor.{proj}_custom_diffusion.weight"] = param.detach() + 0.5 * torch.randn_like(param)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "pytorch_custom_diffusion_weights.safetensors"))
    save_file({token: torch.randn(1, 32)}, str(folder / f"{token}.safetensors"))
    return folder


def make_photo(path: Path, seed: int = 0, size: tuple[int, int] = (40, 48)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(path)
    return path
