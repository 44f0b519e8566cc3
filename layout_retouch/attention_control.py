"""Attention control: one processor class, one controller that knows the step, the paths and the plan.

Every UNet call carries a batch made of paths (reference, layout, target), each with an
unconditional and a conditional half. The controller says which rows are which (`Segment`s),
which step it is, and what the target does at each layer; the processor computes every path's
attention and, for the target, swaps in the layout's or reference's queries, keys and values
(ALGORITHM.md, Stage 2). Sources computed in an earlier call of the same step (a path that ran
through another model) are kept in the controller's per-step store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from layout_retouch.config import LayoutRetouchConfig
from layout_retouch.layers import LayerInfo, attention_layers, select_decoder_layers, select_map_layers
from layout_retouch.masks import resize_mask, threshold_map

REFERENCE, LAYOUT, TARGET = "reference", "layout", "target"
UNCOND, COND = "uncond", "cond"


@dataclass(frozen=True)
class Segment:
    role: str
    half: str
    start: int
    stop: int


@dataclass
class ControlPlan:
    """What the controller does this run: which rules are on, which layers they touch."""

    early_swap: str | None = None  # "map" or "qkv" before S_ref, None: off
    ref_start: int | None = None  # S_ref; None: no reference swap
    mask_start: int | None = None  # S_mask; None: no mask blending
    ref_layers: set[str] = field(default_factory=set)
    blend_layers: set[str] = field(default_factory=set)
    map_layers: set[str] = field(default_factory=set)
    ref_subject_only: bool = True
    ref_mask_threshold: float = 0.1
    # Skip the plain attention of target rows whose output a swap replaces (same result, less work).
    skip_replaced: bool = True

    # When each rule is on, as functions of the step (the controller asks for its current step;
    # the feature recorders ask ahead for the steps Stage 2 will run).
    def early_at(self, step: int) -> bool:
        return self.early_swap is not None and (self.ref_start is None or step < self.ref_start)

    def reference_at(self, step: int, layer: str) -> bool:
        return self.ref_start is not None and step >= self.ref_start and layer in self.ref_layers

    def blend_at(self, step: int, layer: str) -> bool:
        return self.mask_start is not None and step >= self.mask_start and layer in self.blend_layers


class AttentionController:
    """Holds the step, the current call's segments, the subject maps and the per-step source store."""

    def __init__(self, plan: ControlPlan, subject_tokens: dict[str, list[int]] | None = None,
                 latent_size: tuple[int, int] = (64, 64), keep_map_history: bool = False):
        self.plan = plan
        self.subject_tokens = subject_tokens or {}  # role -> token indices in its conditional prompt
        self.latent_size = latent_size
        self.step = 0
        self.segments: list[Segment] = []
        self.last_segments: list[Segment] = []
        self.store: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
        self.maps: dict[str, list[torch.Tensor]] = {}  # role -> this step's (n, h, w) subject maps
        self.previous_maps: dict[str, torch.Tensor] = {}
        self.map_sums: dict[str, torch.Tensor] = {}  # role -> sum over steps, for a run-level map
        self.map_counts: dict[str, int] = {}
        self.history: dict[str, list[torch.Tensor]] = {} if keep_map_history else None
        self.blend_mask_fn = None  # callable(controller) -> (n, H_lat, W_lat) mask, set by Stage 2
        self._blend_mask: torch.Tensor | None = None
        self._resized: dict[tuple, torch.Tensor] = {}
        # Recorded sources (source_features.py): role -> SourceFeatures, read where the path did not run.
        self.features: dict = {}
        # Optional callable(controller, layer, role, half, q, k, v, out) seeing every source segment.
        self.recorder = None

    # --- the loop tells the controller where it is
    def begin_step(self, step: int) -> None:
        self.finish_step()
        self.step = step
        self.store.clear()
        self._blend_mask = None
        self._resized.clear()

    def finish_step(self) -> None:
        for role, maps in self.maps.items():
            if maps:
                mean = torch.stack(maps).mean(0)
                self.previous_maps[role] = mean
                self.map_sums[role] = self.map_sums.get(role, 0) + mean
                self.map_counts[role] = self.map_counts.get(role, 0) + 1
                if self.history is not None:
                    self.history.setdefault(role, []).append(mean)
        self.maps = {}

    def begin_call(self, segments: list[Segment]) -> None:
        self.segments = segments
        if segments:
            self.last_segments = segments

    # --- subject maps from cross-attention
    def wants_maps(self, layer: LayerInfo) -> bool:
        return layer.name in self.plan.map_layers and any(
            s.half == COND and s.role in self.subject_tokens for s in self.segments)

    def add_maps(self, role: str, maps: torch.Tensor) -> None:
        self.maps.setdefault(role, []).append(maps.float())

    def subject_map(self, role: str) -> torch.Tensor | None:
        """This step's mean subject map of `role`, or the last step's if none has run yet."""
        maps = self.maps.get(role)
        if maps:
            return torch.stack(maps).mean(0)
        return self.previous_maps.get(role)

    def run_map(self, role: str) -> torch.Tensor | None:
        """Mean subject map of `role` over all finished steps of the run."""
        self.finish_step()
        if role not in self.map_sums:
            return None
        return self.map_sums[role] / self.map_counts[role]

    # --- what the target does at a layer
    def early_swap_active(self) -> bool:
        return self.plan.early_at(self.step)

    def reference_active(self, layer: LayerInfo) -> bool:
        return self.plan.reference_at(self.step, layer.name)

    def blend_active(self, layer: LayerInfo) -> bool:
        return self.plan.blend_at(self.step, layer.name)

    def has_source(self, layer: LayerInfo, role: str, half: str) -> bool:
        recorded = self.features.get(role)
        return (layer.name, role, half) in self.store or (
            recorded is not None and (self.step, layer.name, half) in recorded.entries)

    def source(self, layer: LayerInfo, role: str, half: str, device) -> tuple[dict | None, bool]:
        """A source's tensors at this layer and step: from this step's calls, else from its recording.

        The flag says whether the keys are already restricted to the subject (recorded reference).
        """
        found = self.store.get((layer.name, role, half))
        if found is not None:
            return found, False
        recorded = self.features.get(role)
        if recorded is None:
            return None, False
        return recorded.get(self.step, layer.name, half, device), recorded.keys_restricted

    def reference_key_mask(self, size: tuple[int, int]) -> torch.Tensor | None:
        """(1, 1, 1, h*w) boolean: which reference keys lie on the reference's subject."""
        if not self.plan.ref_subject_only:
            return None
        ref_map = self.subject_map(REFERENCE)
        if ref_map is None:
            return None
        resized = resize_mask(ref_map[:1], size)
        keep = threshold_map(resized, self.plan.ref_mask_threshold).flatten(1)
        if not keep.any():
            return None
        return keep[:, None, None, :]

    def blend_mask(self, size: tuple[int, int], like: torch.Tensor) -> torch.Tensor | None:
        """(n, 1, h*w, 1) mask M at a layer's resolution, on `like`'s device and dtype, made once per step."""
        if self.blend_mask_fn is None:
            return None
        if self._blend_mask is None:
            self._blend_mask = self.blend_mask_fn(self)
        key = (size, like.device, like.dtype)
        if key not in self._resized:
            resized = resize_mask(self._blend_mask, size)
            self._resized[key] = resized.flatten(1)[:, None, :, None].to(device=like.device, dtype=like.dtype)
        return self._resized[key]


class LayoutRetouchAttnProcessor:
    """The method's attention processor: plain SDPA for every path, controlled attention for the target.

    Only the subject cross-attention maps of `plan.map_layers` (low resolution) are ever materialized;
    every other attention runs as scaled dot-product attention.
    """

    def __init__(self, controller: AttentionController, layer: LayerInfo):
        self.controller = controller
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, length, _ = hidden_states.shape
        if attention_mask is not None:
            source_length = length if encoder_hidden_states is None else encoder_hidden_states.shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, source_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        controller = self.controller
        if not self.layer.cross and controller.segments and attention_mask is None:
            out = self._control(query, key, value)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
            if self.layer.cross and controller.wants_maps(self.layer):
                self._record_maps(attn, query, key)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _record_maps(self, attn, query, key) -> None:
        controller = self.controller
        for seg in controller.segments:
            tokens = controller.subject_tokens.get(seg.role)
            if seg.half != COND or not tokens:
                continue
            q, k = query[seg.start:seg.stop], key[seg.start:seg.stop]
            probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)  # (n, heads, hw, tokens)
            subject = probs[..., tokens].mean(-1).mean(1)  # mean over subject tokens and heads
            h, w = _layer_size(controller.latent_size, self.layer, subject.shape[-1])
            controller.add_maps(seg.role, subject.view(-1, h, w))

    def _control(self, query, key, value):
        controller, layer = self.controller, self.layer
        early = controller.early_swap_active()
        reference = controller.reference_active(layer)
        blend = controller.blend_active(layer)
        plan = controller.plan
        # A target's own plain attention is needed only where no swap replaces it.
        in_call = {(seg.role, seg.half) for seg in controller.segments if seg.role != TARGET}
        skipped = []
        for seg in controller.segments if plan.skip_replaced and (early or reference) else ():
            role = LAYOUT if early else REFERENCE
            if seg.role == TARGET and ((role, seg.half) in in_call or controller.has_source(layer, role, seg.half)):
                skipped.append((seg.start, seg.stop))
        out = _plain_attention(query, key, value, skipped)
        # Keep what a target in a later call of this step may need from the sources of this call.
        for seg in controller.segments:
            if seg.role == TARGET:
                continue
            rows = slice(seg.start, seg.stop)
            q, k, v, o = query[rows], key[rows], value[rows], out[rows]
            controller.store[(layer.name, seg.role, seg.half)] = {"q": q, "k": k, "v": v, "out": o}
            if controller.recorder is not None:
                controller.recorder(controller, layer, seg.role, seg.half, q, k, v, o)
        if not (early or reference or blend):
            return out
        if not skipped:
            out = out.clone()
        for seg in controller.segments:
            if seg.role != TARGET:
                continue
            layout, _ = controller.source(layer, LAYOUT, seg.half, query.device) if early or blend else (None, False)
            ref, restricted = controller.source(layer, REFERENCE, seg.half, query.device) if reference \
                else (None, False)
            rows = slice(seg.start, seg.stop)
            q_t, v_t, n = query[rows], value[rows], seg.stop - seg.start
            target_out = out[rows]
            if early and layout is not None:
                if plan.early_swap == "qkv":
                    target_out = layout["out"]
                else:  # the layout's attention map on the target's own values
                    target_out = F.scaled_dot_product_attention(layout["q"], layout["k"], v_t)
            elif reference and ref is not None:
                k_r, v_r = (ref[x].expand(n, -1, -1, -1) for x in ("k", "v"))
                keep = None
                if not restricted:
                    keep = controller.reference_key_mask(_layer_size(controller.latent_size, layer, key.shape[2]))
                target_out = F.scaled_dot_product_attention(q_t, k_r, v_r, attn_mask=keep)
            if blend and layout is not None:
                mask = controller.blend_mask(_layer_size(controller.latent_size, layer, query.shape[2]), target_out)
                if mask is not None:
                    target_out = mask * target_out + (1 - mask) * layout["out"]
            out[rows] = target_out
        return out


def _plain_attention(query, key, value, skipped: list[tuple[int, int]]) -> torch.Tensor:
    """SDPA over the batch, leaving the `skipped` row ranges uncomputed (their output is replaced)."""
    if not skipped:
        return F.scaled_dot_product_attention(query, key, value)
    out = query.new_empty((*query.shape[:-1], value.shape[-1]))
    start = 0
    for stop, after in [*sorted(skipped), (query.shape[0], query.shape[0])]:
        if stop > start:
            out[start:stop] = F.scaled_dot_product_attention(query[start:stop], key[start:stop], value[start:stop])
        start = max(start, after)
    return out


def _layer_size(latent_size: tuple[int, int], layer: LayerInfo, length: int) -> tuple[int, int]:
    h = max(1, round(latent_size[0] * layer.resolution))
    return h, length // h


def install_processors(unets, controller: AttentionController) -> None:
    """Put the method's processor on every attention layer of each UNet (shared ones once)."""
    for unet in {id(u): u for u in unets}.values():
        layers = {layer.name: layer for layer in attention_layers(unet)}
        processors = {}
        for name in unet.attn_processors:
            module_name = name.removesuffix(".processor")
            if module_name in layers:
                processors[name] = LayoutRetouchAttnProcessor(controller, layers[module_name])
            else:
                processors[name] = unet.attn_processors[name]
        unet.set_attn_processor(processors)


def build_plan(config: LayoutRetouchConfig, unet, *, swap_layout: bool, swap_reference: bool,
               blend: bool, record_maps: bool = True) -> ControlPlan:
    """Turn the config's step ranges and layer rules into a plan for this UNet."""
    layers = attention_layers(unet)
    ref_layers = select_decoder_layers(layers, config.ref_min_resolution, config.ref_layer_indices)
    blend_layers = select_decoder_layers(layers, config.blend_min_resolution, config.ref_layer_indices)
    return ControlPlan(
        early_swap=config.early_swap if swap_layout else None,
        ref_start=config.ref_start_step if swap_reference else None,
        mask_start=config.mask_start if blend else None,
        ref_layers=ref_layers,
        blend_layers=blend_layers if blend else set(),
        map_layers=select_map_layers(layers, config.mask_attention_resolution) if record_maps else set(),
        ref_subject_only=config.ref_subject_only,
        ref_mask_threshold=config.ref_mask_threshold,
        skip_replaced=config.skip_replaced_attention,
    )
