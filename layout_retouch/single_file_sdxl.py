"""Writing an SDXL pipeline as one checkpoint file in the original (SGM) layout, as SDXL checkpoints are shared.

The UNet and VAE take SD 1.x's names (single_file.py) plus the UNet's added embedding (`label_emb`); the first
text encoder sits under `conditioner.embedders.0.transformer.` with CLIP's own names, the second under
`conditioner.embedders.1.model.` with OpenCLIP's (one fused q/k/v projection per layer, the text projection
as a matrix that multiplies from the right). `load_model_pair` reads such a file back with `base_config`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import save_file

from layout_retouch.single_file import UNET, VAE, _clip_name, _renamed, _unet_name, _vae_name

CLIP_L, OPEN_CLIP_G = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def export_sdxl_single_file(pipe: StableDiffusionXLPipeline, path: str | Path) -> Path:
    """Save `pipe`'s UNet, VAE and both text encoders as one safetensors file in the original SDXL layout."""
    state = {}
    state.update(_renamed(pipe.unet.state_dict(), _sdxl_unet_name(pipe.unet.config), UNET))
    state.update(_renamed(pipe.vae.state_dict(), _vae_name(len(pipe.vae.config.up_block_types)), VAE))
    state.update(_renamed(pipe.text_encoder.state_dict(), _clip_name, CLIP_L))
    state.update({OPEN_CLIP_G + k: v for k, v in open_clip_state(pipe.text_encoder_2.state_dict()).items()})
    path = Path(path)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    return path


def _sdxl_unet_name(config):
    rename = _unet_name(config)

    def name(key: str) -> str | None:
        if key.startswith("add_embedding.linear_"):  # linear_1 -> label_emb.0.0, linear_2 -> label_emb.0.2
            layer, _, param = key.rpartition(".")
            return f"label_emb.0.{2 * (int(layer[-1]) - 1)}.{param}"
        return rename(key)

    return name


def open_clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection's weights under OpenCLIP's names."""
    out, qkv = {}, {}
    for key, value in state.items():
        key = key.removeprefix("text_model.")
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out[f"ln_final.{key.rpartition('.')[2]}"] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T
        elif key.startswith("encoder.layers."):
            index, rest = key.removeprefix("encoder.layers.").split(".", 1)
            layer, _, param = rest.rpartition(".")
            if layer in QKV:
                qkv.setdefault((index, param), {})[layer] = value
            else:
                out[f"transformer.resblocks.{index}.{OPEN_CLIP_LAYER[layer]}.{param}"] = value
        else:
            raise ValueError(f"{key} has no place in an OpenCLIP text encoder")
    for (index, param), parts in qkv.items():
        out[f"transformer.resblocks.{index}.attn.in_proj_{param}"] = torch.cat([parts[name] for name in QKV])
    return out
