"""DreamMatcher's appearance matching self-attention (AMA), as an attention processor of its own.

One UNet call holds the reference path (its unconditional row, then its conditional row) and the target
images (all unconditional rows, then all conditional ones). In the chosen decoder self-attention layers the
target keeps its own queries and keys, so its structure stays, and reads values in which the reference's
values, warped onto the target by semantic matching, replace its own where the matching is trusted
(cycle-consistent) and on the subject (the target's subject cross-attention): the semantic-consistent mask.
Matching uses the decoder features of the previous UNet call, as DreamMatcher's code does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from layout_retouch.baselines.matching import (
    confidence,
    cycle_error,
    descriptors,
    nearest_matches,
    resize_descriptor,
    warp,
)
from layout_retouch.layers import attention_layers, select_decoder_layers, select_map_layers


class MatchingControl:
    """Knows the step, the batch layout, the decoder features and the target's subject maps."""

    def __init__(self, unet, settings, map_resolution: float, latent_size: tuple[int, int], images: int,
                 tokens: list[int]):
        layers = attention_layers(unet)
        self.settings = settings
        self.match_layers = select_decoder_layers(layers, settings.min_resolution)
        self.map_layers = select_map_layers(layers, map_resolution)
        self.latent_size, self.n, self.tokens = latent_size, images, tokens
        self.step, self.active = 0, False
        self.features: dict[tuple[int, int], torch.Tensor] = {}  # the last call's decoder outputs, by size
        self._collecting: dict[tuple[int, int], torch.Tensor] = {}
        self.maps: list[torch.Tensor] = []  # this step's (n, h, w) target subject maps
        self.previous_map: torch.Tensor | None = None
        self._matches: dict = {}

    # --- batch layout: [reference uncond, reference cond, targets uncond..., targets cond...]
    def target_rows(self, half: int) -> slice:
        return slice(2 + half * self.n, 2 + (half + 1) * self.n)

    # --- the loop's calls
    def begin_step(self, step: int, active: bool) -> None:
        if self.maps:
            self.previous_map = torch.stack(self.maps).mean(0)
        self.step, self.active, self.maps, self._matches = step, active, [], {}

    def collect(self, output: torch.Tensor) -> None:
        """Forward hook on the decoder blocks: keep the first output at each size (DIFT's decoder features)."""
        self._collecting.setdefault(tuple(output.shape[-2:]), output.detach())

    def end_call(self) -> None:
        """This call's features replace the last ones (the next step matches with them; so does guidance now)."""
        self.features, self._collecting, self._matches = self._collecting, {}, {}

    # --- what the processors ask
    def foreground(self, size: tuple[int, int]) -> torch.Tensor:
        """(n, h*w) target subject map, min-max normalized (DreamMatcher: its conditional half's, for both halves)."""
        maps = torch.stack(self.maps).mean(0) if self.maps else self.previous_map
        if maps is None:
            return torch.ones(self.n, size[0] * size[1])
        low = maps.flatten(1).min(1).values[:, None, None]
        high = maps.flatten(1).max(1).values[:, None, None]
        maps = (maps - low) / (high - low).clamp_min(1e-8)
        return F.interpolate(maps[:, None].float(), size=size, mode="nearest")[:, 0].flatten(1)

    def scale_features(self, rows: int | slice) -> list[torch.Tensor]:
        """The decoder features at 1/2 and 1/1 of the latent (coarse first) of some rows."""
        h, w = self.latent_size
        return [self.features[s][rows] for s in ((h // 2, w // 2), (h, w)) if s in self.features]

    def matches(self, half: int, size: tuple[int, int], cycle_threshold: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per target image of a CFG half at a layer size: its matches into the reference (n, hw) and the
        semantic-consistent mask (n, hw): cycle-consistent and, with `foreground_mask`, on the subject."""
        threshold = self.settings.cycle_threshold if cycle_threshold is None else cycle_threshold
        key = (half, size, threshold)
        if key not in self._matches:
            reference = self.scale_features(half)
            targets = self.scale_features(self.target_rows(half))
            foreground = self.foreground(size)
            flows, masks = [], []
            for i in range(self.n):
                ref_desc, tgt_desc = descriptors(reference, [t[i] for t in targets], self.settings.feature_dims)
                t2r, r2t = nearest_matches(resize_descriptor(tgt_desc, size), resize_descriptor(ref_desc, size))
                fg = foreground[i].to(t2r.device)
                mask = confidence(cycle_error(t2r, r2t, size[1]), fg, threshold, size[0])
                flows.append(t2r)
                masks.append(mask * fg if self.settings.foreground_mask else mask)
            self._matches[key] = (torch.stack(flows), torch.stack(masks))
        return self._matches[key]

    def processors(self, unet) -> dict:
        """Our processor on the matched and the map layers; the UNet's own everywhere else."""
        chosen = self.match_layers | self.map_layers
        return {name: MatchingAttnProcessor(self, name.removesuffix(".processor"))
                if name.removesuffix(".processor") in chosen else processor
                for name, processor in unet.attn_processors.items()}


class MatchingAttnProcessor:
    """Plain attention for every row; AMA for the target rows of matched layers; subject maps at map layers."""

    def __init__(self, control: MatchingControl, layer: str):
        self.control, self.layer = control, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        batch, length, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        heads = attn.heads
        q, k, v = (proj(x).view(batch, -1, heads, proj.out_features // heads).transpose(1, 2)
                   for proj, x in ((attn.to_q, hidden_states), (attn.to_k, context), (attn.to_v, context)))
        out = F.scaled_dot_product_attention(q, k, v)
        control = self.control
        if encoder_hidden_states is not None:
            if self.layer in control.map_layers and control.tokens:
                rows = control.target_rows(1)
                probs = (q[rows] @ k[rows].transpose(-1, -2) * attn.scale).softmax(-1)
                side = self._size(length)
                control.maps.append(probs[..., control.tokens].mean(-1).mean(1).view(-1, *side))
        elif control.active and self.layer in control.match_layers:
            out = out.clone()
            size = self._size(length)
            for half in (0, 1):
                rows = control.target_rows(half)
                flow, mask = control.matches(half, size)
                mask = mask.to(v.dtype)[:, None, :, None]  # (n, 1, hw, 1)
                values = warp(v[half], flow).transpose(0, 1)  # the reference's values on the target's pixels
                values = mask * values + (1 - mask) * v[rows]
                keys = k[rows]
                if control.settings.key_replace:
                    keys = mask * warp(k[half], flow).transpose(0, 1) + (1 - mask) * keys
                out[rows] = F.scaled_dot_product_attention(q[rows], keys, values)
        out = out.transpose(1, 2).reshape(batch, -1, heads * v.shape[-1]).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _size(self, length: int) -> tuple[int, int]:
        h, w = self.control.latent_size
        ratio = math.sqrt(length / (h * w))
        return round(h * ratio), round(w * ratio)
