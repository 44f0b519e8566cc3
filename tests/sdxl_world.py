"""Tiny SDXL personalizations written to disk as SDXL users have them: a diffusers LoRA, a two-encoder TI."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from layout_retouch.tiny_sdxl import TEXT_WIDTH, TEXT_WIDTH_2, save_tiny_sdxl_pipeline, tiny_sdxl_components


def make_sdxl_base(folder: Path) -> Path:
    return save_tiny_sdxl_pipeline(folder, seed=0)


def make_sdxl_lora(folder: Path) -> Path:
    """What diffusers' train_dreambooth_lora_sdxl.py saves: pytorch_lora_weights.safetensors, UNet attention."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = tiny_sdxl_components(seed=0)["unet"]
    torch.manual_seed(5)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet),
                                                safe_serialization=True)
    return folder


def make_sdxl_textual_inversion(path: Path, token: str = "<cat-toy>", vectors: int = 2) -> Path:
    """SDXL Textual Inversion: clip_l vectors for the first text encoder, clip_g for the second."""
    torch.manual_seed(6)
    save_file({"clip_l": torch.randn(vectors, TEXT_WIDTH), "clip_g": torch.randn(vectors, TEXT_WIDTH_2)}, str(path))
    return path


def make_sdxl_dreambooth(folder: Path) -> Path:
    """A full SDXL DreamBooth: another UNet and a fine-tuned second text encoder; the first left as it was."""
    base, tuned = tiny_sdxl_components(seed=0), tiny_sdxl_components(seed=1)
    base.update(unet=tuned["unet"], text_encoder_2=tuned["text_encoder_2"])
    StableDiffusionXLPipeline(**base, add_watermarker=False).save_pretrained(folder, safe_serialization=True)
    return folder


def make_sdxl_kohya_lora(folder: Path, diffusers_lora: Path) -> Path:
    """The same LoRA as kohya's sd-scripts names SDXL's: `lora_unet_` + the original (SGM) module path with
    "_" for ".", lora_down / lora_up, and an alpha per module (= rank: scale 1, as the PEFT one)."""
    from layout_retouch.single_file import _unet_name

    rename = _unet_name(tiny_sdxl_components(seed=0)["unet"].config)
    state = {}
    for key, value in load_file(str(diffusers_lora / "pytorch_lora_weights.safetensors")).items():
        module, _, rest = key.removeprefix("unet.").partition(".lora_")
        name = "lora_unet_" + rename(f"{module}.weight").removesuffix(".weight").replace(".", "_")
        down = rest.startswith("A")
        state[f"{name}.{'lora_down' if down else 'lora_up'}.weight"] = value
        if down:
            state[f"{name}.alpha"] = torch.tensor(float(value.shape[0]))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "pytorch_lora_weights.safetensors"))
    return folder
