"""Writing an SD 1.x pipeline as one checkpoint file in the original (LDM) layout.

That is the layout A1111, ComfyUI and model-sharing sites use, so a DreamBooth made here can be shared
as one file; `load_model_pair` reads such files back (with `base_config` naming a diffusers folder).
Only the UNet, VAE and CLIP text encoder are written: the tokenizer and scheduler come from the config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

UNET, VAE, CLIP = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def export_single_file(pipe: StableDiffusionPipeline, path: str | Path) -> Path:
    """Save `pipe`'s UNet, VAE and text encoder as one safetensors file in the original SD layout."""
    state = {}
    state.update(_renamed(pipe.unet.state_dict(), _unet_name(pipe.unet.config), UNET))
    state.update(_renamed(pipe.vae.state_dict(), _vae_name(len(pipe.vae.config.up_block_types)), VAE))
    state.update(_renamed(pipe.text_encoder.state_dict(), _clip_name, CLIP))
    path = Path(path)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    return path


def _renamed(state: dict[str, torch.Tensor], rename, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        name = rename(key)
        if name is None:
            raise ValueError(f"{key} has no place in an SD 1.x checkpoint: is this an SD 1.x model?")
        if name.startswith(("encoder.mid.attn_1.", "decoder.mid.attn_1.")) and value.ndim == 2:
            value = value[:, :, None, None]  # the original VAE attention projections are 1x1 convolutions
        out[prefix + name] = value
    return out


def _split(key: str, head: str) -> tuple[int, str, int, str] | None:
    """'down_blocks.1.resnets.0.conv1.weight' -> (1, 'resnets', 0, 'conv1.weight') for head 'down_blocks'."""
    parts = key.split(".")
    if parts[0] != head or len(parts) < 5:
        return None
    return int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])


def _resnet(rest: str, names: dict[str, str]) -> str:
    layer, _, param = rest.rpartition(".")
    return f"{names.get(layer, layer)}.{param}"


def _unet_name(config):
    per_block = config.layers_per_block + 1  # the resnets of a level and its down/upsampler (or extra resnet)

    def rename(key: str) -> str | None:
        layer, _, param = key.rpartition(".")
        if layer in UNET_TOP:
            return f"{UNET_TOP[layer]}.{param}"
        if key.startswith("mid_block."):
            _, kind, index, rest = key.split(".", 3)
            if kind == "resnets":
                return f"middle_block.{2 * int(index)}.{_resnet(rest, UNET_RESNET)}"
            return f"middle_block.1.{rest}" if kind == "attentions" else None
        if parts := _split(key, "down_blocks"):
            block, kind, index, rest = parts
            first = 1 + block * per_block
            if kind == "downsamplers":
                return f"input_blocks.{first + per_block - 1}.0.op.{rest.removeprefix('conv.')}"
            slot = {"resnets": f"0.{_resnet(rest, UNET_RESNET)}", "attentions": f"1.{rest}"}.get(kind)
            return slot and f"input_blocks.{first + index}.{slot}"
        if parts := _split(key, "up_blocks"):
            block, kind, index, rest = parts
            last = (block + 1) * per_block - 1
            if kind == "upsamplers":
                after = 2 if "CrossAttn" in config.up_block_types[block] else 1  # after the attention, if any
                return f"output_blocks.{last}.{after}.{rest}"
            slot = {"resnets": f"0.{_resnet(rest, UNET_RESNET)}", "attentions": f"1.{rest}"}.get(kind)
            return slot and f"output_blocks.{block * per_block + index}.{slot}"
        return None

    return rename


def _vae_name(levels: int):
    def rename(key: str) -> str | None:
        side, _, key_in = key.partition(".")
        if side not in ("encoder", "decoder"):
            return key if key.split(".")[0] in ("quant_conv", "post_quant_conv") else None
        if key_in.startswith("conv_norm_out."):
            return f"{side}.norm_out.{key_in.removeprefix('conv_norm_out.')}"
        if key_in.startswith(("conv_in.", "conv_out.")):
            return key
        if key_in.startswith("mid_block."):
            _, kind, index, rest = key_in.split(".", 3)
            if kind == "resnets":
                return f"{side}.mid.block_{int(index) + 1}.{_resnet(rest, {'conv_shortcut': 'nin_shortcut'})}"
            layer, _, param = rest.rpartition(".")
            return f"{side}.mid.attn_1.{VAE_ATTENTION[layer]}.{param}" if layer in VAE_ATTENTION else None
        head = "down_blocks" if side == "encoder" else "up_blocks"
        parts = _split(key_in, head)
        if parts is None:
            return None
        block, kind, index, rest = parts
        level = block if side == "encoder" else levels - 1 - block  # the original decoder counts upwards
        where = f"{side}.{'down' if side == 'encoder' else 'up'}.{level}"
        if kind in ("downsamplers", "upsamplers"):
            return f"{where}.{kind[:-2]}.{rest}"  # 'downsample.conv.weight'
        return f"{where}.block.{index}.{_resnet(rest, {'conv_shortcut': 'nin_shortcut'})}" if kind == "resnets" \
            else None

    return rename


def _clip_name(key: str) -> str:
    # transformers >= 5.6 flattens CLIPTextModel; the original layout keeps the `text_model.` level.
    return key if key.startswith("text_model.") else f"text_model.{key}"
