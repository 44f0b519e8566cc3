"""Where each attention layer of a UNet sits, so layers are chosen by place, not by SD 1.x indices.

SD 1.x has 16 transformer blocks, indexed 0-15 in call order: down 64² (0-1), 32² (2-3), 16² (4-5),
mid 8² (6), up 16² (7-9), 32² (10-12), 64² (13-15). The paper's "l >= 10" is "decoder layers at 1/2
and 1/1 of the latent resolution", a rule that also holds for SD 2.x and the toy world's UNet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from diffusers.models.attention_processor import Attention

PLACES = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
_NAME = re.compile(
    r"^(down_blocks|up_blocks|mid_block)\.?(\d*)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.(attn[12])$"
)


@dataclass(frozen=True)
class LayerInfo:
    name: str  # module name of the Attention inside the UNet
    index: int  # call-order index of its transformer block (SD 1.x: 0-15)
    place: str  # "down", "mid" or "up"
    resolution: float  # side of its feature map as a fraction of the latent's (1, 1/2, 1/4, ...)
    cross: bool  # attn2 (text) rather than attn1 (self)


def attention_layers(unet) -> list[LayerInfo]:
    """Every attention layer of a diffusers UNet2DConditionModel, in call order."""
    n_down = len(unet.config.down_block_types)
    n_up = len(unet.config.up_block_types)
    found = []
    for name, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        m = _NAME.match(name)
        if m is None:
            continue
        group, block, attention, transformer, which = m.groups()
        block = int(block) if block else 0
        if group == "down_blocks":
            level = block
        elif group == "mid_block":
            level = n_down - 1
        else:
            level = n_up - 1 - block
        order = (PLACES[group], block, int(attention), int(transformer))
        found.append((order, name, group.split("_")[0], 1.0 / 2**level, which == "attn2"))
    found.sort(key=lambda item: (item[0], item[4]))
    layers, index, last = [], -1, None
    for order, name, place, resolution, cross in found:
        if order != last:
            index, last = index + 1, order
        layers.append(LayerInfo(name, index, place, resolution, cross))
    return layers


def select_decoder_layers(layers: list[LayerInfo], min_resolution: float,
                          indices: tuple[int, ...] | None = None) -> set[str]:
    """Self-attention layers of the decoder at or above `min_resolution` (or exactly `indices`)."""
    if indices is not None:
        return {layer.name for layer in layers if not layer.cross and layer.index in indices}
    return {layer.name for layer in layers
            if not layer.cross and layer.place == "up" and layer.resolution >= min_resolution - 1e-9}


def select_map_layers(layers: list[LayerInfo], resolution: float) -> set[str]:
    """Cross-attention layers at `resolution` of the latent: the ones whose maps make the masks."""
    chosen = {layer.name for layer in layers if layer.cross and abs(layer.resolution - resolution) < 1e-9}
    if not chosen:
        available = sorted({layer.resolution for layer in layers if layer.cross})
        raise ValueError(
            f"this UNet has no cross-attention at {resolution} of the latent resolution; it has {available}. "
            "Set mask_attention_resolution to one of those."
        )
    return chosen
