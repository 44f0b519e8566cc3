"""Attention control: one processor class, one controller that knows the step, the paths and the plan.

Every UNet call carries a batch made of paths (reference, layout, target), each with an
unconditional and a conditional half, side by side. The controller says which rows are whose (`PathRows`),
which step it is, and what the target does at each layer; the processor computes every path's
attention and, for the target, swaps in the layout's or reference's queries, keys and values
(ALGORITHM.md, Stage 2). Sources computed in an earlier call of the same step (a path that ran
through another model) are kept in the controller's per-step store. A call can also carry two runs at
different steps (Stage 2's first steps riding in Stage 1's calls): each has its controller and its rows
(`AttentionController.shared`), and the processor applies each controller's rules to its own rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from layout_retouch.config import LayoutRetouchConfig
from layout_retouch.layers import LayerInfo, attention_layers, select_decoder_layers, select_map_layers
from layout_retouch.masks import resize_mask, threshold_map

REFERENCE, LAYOUT, TARGET = "reference", "layout", "target"
INVERSION = "inversion"  # the reference being inverted in Stage 1's calls: lends nothing, borrows nothing


@dataclass(frozen=True)
class PathRows:
    """A path's rows in a UNet call's batch: its unconditional half, then its conditional half.

    (An unguided path, the inversion, has conditional rows only; no rule reads its halves.)

    Keeping each path's halves side by side lets the target borrow from a source with one batched
    operation (the halves pair up row for row) and lets a recorder keep a source without copying it.
    """

    role: str
    start: int
    stop: int

    @property
    def per_half(self) -> int:
        return (self.stop - self.start) // 2

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def cond(self) -> slice:
        return slice(self.start + self.per_half, self.stop)


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
    # Compute a call's subject maps for all its map layers at once (a few operators per call, not per layer).
    batch_maps: bool = True
    # The target's first step (T_l where it starts from the layout, config.target_start): the layout lends
    # nothing for the steps before it, so its recorder keeps nothing of them.
    target_from: int = 0

    # When each rule is on, as functions of the step (the controller asks for its current step;
    # the feature recorders ask ahead for the steps Stage 2 will run).
    def early_at(self, step: int) -> bool:
        return (self.early_swap is not None and step >= self.target_from
                and (self.ref_start is None or step < self.ref_start))

    def reference_at(self, step: int, layer: str) -> bool:
        return self.ref_start is not None and step >= self.ref_start and layer in self.ref_layers

    def blend_at(self, step: int, layer: str) -> bool:
        return (self.mask_start is not None and step >= max(self.mask_start, self.target_from)
                and layer in self.blend_layers)


class AttentionController:
    """Holds the step, the current call's path rows, the subject maps and the per-step source store."""

    def __init__(self, plan: ControlPlan, subject_tokens: dict[str, list[int]] | None = None,
                 latent_size: tuple[int, int] = (64, 64), keep_map_history: bool = False):
        self.plan = plan
        self.subject_tokens = subject_tokens or {}  # role -> token indices in its conditional prompt
        self.latent_size = latent_size
        self.step = 0
        self.paths: dict[str, PathRows] = {}  # role -> its rows in the current UNet call
        self.last_paths: dict[str, PathRows] = {}
        # (layer, role) -> a source's tensors from a call without the target, for the target's call later
        # in the same step (a path that ran through the other model).
        self.store: dict[tuple[str, str], SourceRows] = {}
        self.maps: dict[str, list[torch.Tensor]] = {}  # role -> this step's (layers, n, h, w) subject maps
        self._pending_maps: list[tuple] = []  # this call's map layers' (query, key, scale, size), batched later
        self.previous_maps: dict[str, torch.Tensor] = {}
        self.map_sums: dict[str, torch.Tensor] = {}  # role -> sum over steps, for a run-level map
        self.map_counts: dict[str, int] = {}
        self.history: dict[str, list[torch.Tensor]] = {} if keep_map_history else None
        self.blend_mask_fn = None  # callable(controller) -> (n, H_lat, W_lat) mask, set by Stage 2
        self._blend_mask: torch.Tensor | None = None
        self._resized: dict[tuple, torch.Tensor | None] = {}  # this step's masks at each layer size
        # Recorded sources (source_features.py): role -> SourceFeatures, read where the path did not run.
        self.features: dict = {}
        # Optional callable(controller, layer, role, tensors) seeing every source path's self-attention;
        # `tensors` gives "q", "k", "v", "out" of the path's rows (unconditional half, then conditional).
        self.recorder = None
        # Set by the loop for a UNet call that carries other runs' rows too (sampling.shared_guided_eps): each
        # run's controller and its rows in the batch, in order. The processors are this controller's.
        self.shared: list[tuple[AttentionController, slice]] | None = None

    # --- the loop tells the controller where it is
    def begin_step(self, step: int) -> None:
        self.finish_step()
        for recorded in self.features.values():  # what the steps before lent is not lent again
            recorded.release_before(step)
        self.step = step
        self.store.clear()
        self._blend_mask = None
        self._resized.clear()

    def finish_step(self) -> None:
        self._flush_maps()
        for role, maps in self.maps.items():
            if maps:
                mean = _layer_mean(maps)
                self.previous_maps[role] = mean
                self.map_sums[role] = self.map_sums.get(role, 0) + mean
                self.map_counts[role] = self.map_counts.get(role, 0) + 1
                if self.history is not None:
                    self.history.setdefault(role, []).append(mean)
        self.maps = {}

    def begin_call(self, paths: list[PathRows]) -> None:
        self._flush_maps()  # with the rows of the call that made them
        self.paths = {p.role: p for p in paths}
        if paths:
            self.last_paths = self.paths

    # --- subject maps from cross-attention
    def wants_maps(self, layer: LayerInfo) -> bool:
        return layer.name in self.plan.map_layers and any(role in self.subject_tokens for role in self.paths)

    def add_maps(self, role: str, maps: torch.Tensor) -> None:
        """One layer's (n, h, w) subject maps of `role`."""
        self.maps.setdefault(role, []).append(maps.float()[None])

    def defer_maps(self, query: torch.Tensor, key: torch.Tensor, scale: float, size: tuple[int, int]) -> None:
        """A map layer's whole-call query and key (no operator here): its maps are made with the call's others."""
        self._pending_maps.append((query, key, scale, size))

    def _flush_maps(self) -> None:
        """The deferred layers' subject maps, one batched softmax per group of like-shaped layers.

        What `add_maps` receives layer by layer, per path with subject tokens: the conditional rows'
        attention probabilities on the subject tokens, averaged over tokens and heads. All rows are
        multiplied at once (one matmul, one softmax), then each path takes its conditional rows.
        """
        if not self._pending_maps:
            return
        pending, self._pending_maps = self._pending_maps, []
        groups: dict[tuple, list] = {}
        for query, key, scale, size in pending:
            groups.setdefault((query.shape, key.shape, scale, size), []).append((query, key))
        for (_, _, scale, (h, w)), layers in groups.items():
            query = layers[0][0][None] if len(layers) == 1 else torch.stack([q for q, _ in layers])
            key = layers[0][1][None] if len(layers) == 1 else torch.stack([k for _, k in layers])
            probs = (query @ key.transpose(-1, -2) * scale).softmax(-1)  # (layers, rows, heads, hw, tokens)
            for path in self.paths.values():
                tokens = self.subject_tokens.get(path.role)
                if tokens:
                    subject = probs[:, path.cond][..., tokens].mean(-1).mean(2)  # over subject tokens, then heads
                    self.maps.setdefault(path.role, []).append(subject.view(len(layers), -1, h, w).float())

    def subject_map(self, role: str, complete: bool = False) -> torch.Tensor | None:
        """This step's mean subject map of `role`, or the last step's if none has run yet.

        `complete`: the last step's also where only some of the map layers have run this step (a blend layer
        that comes before the decoder's map layers, as in a small UNet; in SD 1.x/2.x and SDXL the blend layers
        follow every map layer), unless there is no last step: one encoder layer's map is not the step's map.
        """
        self._flush_maps()
        maps = self.maps.get(role)
        if maps and complete and role in self.previous_maps and sum(map(len, maps)) < len(self.plan.map_layers):
            return self.previous_maps[role]
        return _layer_mean(maps) if maps else self.previous_maps.get(role)

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

    def has_source(self, layer: LayerInfo, role: str) -> bool:
        recorded = self.features.get(role)
        return role in self.paths or (layer.name, role) in self.store or (
            recorded is not None and (self.step, layer.name) in recorded.entries)

    def source(self, layer: LayerInfo, role: str, device, here: dict | None = None) -> tuple[object | None, bool]:
        """A source's tensors (rows: unconditional half, then conditional) at this layer and step.

        From this call (`here`) or an earlier call of this step, else from its recording. The flag says
        whether the keys are already restricted to the subject (a recorded reference).
        """
        found = (here or {}).get(role) or self.store.get((layer.name, role))
        if found is not None:
            return found, False
        recorded = self.features.get(role)
        if recorded is None:
            return None, False
        return recorded.get(self.step, layer.name, device), recorded.keys_restricted

    def reference_key_mask(self, size: tuple[int, int]) -> torch.Tensor | None:
        """(1, 1, 1, h*w) boolean: which reference keys lie on the reference's subject.

        Made once per size for the subject maps seen so far in the step (the layers that read it come
        after the map layers in a UNet call), not at every layer.
        """
        if not self.plan.ref_subject_only:
            return None
        self._flush_maps()
        key = ("reference keys", size, sum(len(m) for m in self.maps.get(REFERENCE, ())))
        if key not in self._resized:
            ref_map = self.subject_map(REFERENCE)
            keep = None
            if ref_map is not None:
                keep = threshold_map(resize_mask(ref_map[:1], size), self.plan.ref_mask_threshold).flatten(1)
                keep = keep[:, None, None, :] if keep.any() else None
            self._resized[key] = keep
        return self._resized[key]

    def blend_mask(self, size: tuple[int, int], like: torch.Tensor) -> torch.Tensor | None:
        """(2n, h*w, 1) mask M for both CFG halves at a layer's resolution, laid out as a layer output's
        (rows, tokens, channels) and like `like`; made once per step and size, not at every layer."""
        if self.blend_mask_fn is None:
            return None
        if self._blend_mask is None:
            self._blend_mask = self.blend_mask_fn(self)
        key = (size, like.device, like.dtype)
        if key not in self._resized:
            mask = self._blend_mask
            if tuple(mask.shape[-2:]) != tuple(size):
                mask = resize_mask(mask, size)
            resized = mask.reshape(mask.shape[0], -1, 1)
            self._resized[key] = torch.cat([resized, resized]).to(device=like.device, dtype=like.dtype)
        return self._resized[key]


def _layer_mean(maps: list[torch.Tensor]) -> torch.Tensor:
    """The mean over layers of (layers, n, h, w) chunks of subject maps."""
    return maps[0].mean(0) if len(maps) == 1 else torch.cat(maps).mean(0)


@dataclass
class SourceRows:
    """A source path's rows of one call's attention tensors, sliced only when asked for."""

    tensors: dict[str, torch.Tensor]  # q, k, v, out of the whole call
    rows: slice

    def __getitem__(self, name: str) -> torch.Tensor:
        return _take(self.tensors[name], self.rows)

    def own(self, name: str) -> torch.Tensor:
        """The rows in storage of their own, for keeping past the call without the other paths' rows.

        (Nor other tensors' elements: a fused projection's query is a view into the keys and values too.)
        """
        whole = self.tensors[name]
        if self.rows.start == 0 and self.rows.stop == whole.shape[0]:
            if whole.untyped_storage().nbytes() == whole.numel() * whole.element_size():
                return whole
            return whole.clone()
        return whole[self.rows].clone()  # dense rows keep their strides: the target's attention is laid out alike


def _take(tensor: torch.Tensor, rows: slice) -> torch.Tensor:
    return tensor if rows.start == 0 and rows.stop == tensor.shape[0] else tensor[rows]


class LayoutRetouchAttnProcessor:
    """The method's attention processor: plain SDPA for every path, controlled attention for the target.

    Only the subject cross-attention maps of `plan.map_layers` (low resolution) are ever materialized;
    every other attention runs as scaled dot-product attention. The target's halves pair up row for row
    with each source's, so each rule is one batched operation over both halves.
    """

    def __init__(self, controller: AttentionController, layer: LayerInfo):
        self.controller = controller
        self.layer = layer

    # Left out of torch.compile's graphs: what it does depends on the controller's step and paths, which would
    # recompile the UNet at every change (and exhaust dynamo's recompile limit within a run).
    @torch.compiler.disable
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

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = _project(attn, hidden_states, context, encoder_hidden_states is None)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # The controllers whose rows this call holds: one, or several runs sharing the call (their rows in order).
        parts = self.controller.shared
        if parts is None:
            parts = ((self.controller, None),)
            results = [self._attention(self.controller, attn, query, key, value, attention_mask)]
        elif self.layer.cross or attention_mask is not None:  # no rule applies here: one attention for all rows
            results = [(F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask), {}, False)]
            for controller, rows in parts:
                if self.layer.cross and controller.wants_maps(self.layer):
                    self._maps(controller, attn, query[rows], key[rows])
            parts = ((None, None),)
        else:
            results = [self._attention(controller, attn, query[rows], key[rows], value[rows], None)
                       for controller, rows in parts]
        outs = _project_out(attn, [out for out, _, _ in results], query.dtype)
        for i, ((controller, _), (_, here, controlled)) in enumerate(zip(parts, results, strict=True)):
            if controlled:  # the layer's output h, after its projection: what sources lend and the blend mixes
                outs[i] = self._lend_and_blend(controller, here, outs[i], query.device)
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _attention(self, controller: AttentionController, attn, query, key, value, attention_mask
                   ) -> tuple[torch.Tensor | None, dict, bool]:
        """One controller's rows (all of the call's, or its part of a shared call): the attention before the
        output projection, the sources it lends, and whether the rules apply (a self-attention layer)."""
        controlled = bool(not self.layer.cross and controller.paths and attention_mask is None)
        if controlled:
            out, here = self._attend(controller, query, key, value)
            return out, here, True
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        if self.layer.cross and controller.wants_maps(self.layer):
            self._maps(controller, attn, query, key)
        return out, {}, False

    def _maps(self, controller: AttentionController, attn, query, key) -> None:
        """A map layer's subject maps of the controller's rows: deferred to the call's batch, or made now."""
        if controller.plan.batch_maps:
            controller.defer_maps(query, key, attn.scale, _layer_size(controller.latent_size, self.layer,
                                                                      query.shape[2]))
        else:
            self._record_maps(controller, attn, query, key)

    def _record_maps(self, controller: AttentionController, attn, query, key) -> None:
        for path in controller.paths.values():
            tokens = controller.subject_tokens.get(path.role)
            if not tokens:
                continue
            q, k = query[path.cond], key[path.cond]
            probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)  # (n, heads, hw, tokens)
            subject = probs[..., tokens].mean(-1).mean(1)  # mean over subject tokens and heads
            h, w = _layer_size(controller.latent_size, self.layer, subject.shape[-1])
            controller.add_maps(path.role, subject.view(-1, h, w))

    def _attend(self, controller: AttentionController, query, key, value) -> tuple[torch.Tensor | None, dict]:
        """Every path's attention before the output projection, the target's with the swaps of Q, K, V.

        Returns it (None where nothing is left to project: a target alone whose output the layout's
        replaces) and the sources of this call, whose "out" the projection fills in.
        """
        layer, plan = self.layer, controller.plan
        early = controller.early_swap_active()
        reference = controller.reference_active(layer)
        target = controller.paths.get(TARGET)
        # The target's own attention is needed only where no swap replaces it.
        replacer = LAYOUT if early else REFERENCE
        replaced = (target is not None and plan.skip_replaced and (early or reference)
                    and controller.has_source(layer, replacer))
        out = _plain_attention(query, key, value, target.rows if replaced else None)
        tensors = {"q": query, "k": key, "v": value}
        here = {path.role: SourceRows(tensors, path.rows) for path in controller.paths.values() if path.role != TARGET}
        if target is None or not (early or reference) or (early and plan.early_swap == "qkv"):
            return out, here  # the "qkv" swap takes the layout's whole output, after the projection
        rows, n = target.rows, target.per_half
        target_out = None
        if early:
            layout = controller.source(layer, LAYOUT, query.device, here)[0]
            if layout is not None:  # the layout's attention map on the target's own values
                target_out = F.scaled_dot_product_attention(layout["q"], layout["k"], _take(value, rows))
        else:
            ref, restricted = controller.source(layer, REFERENCE, query.device, here)
            if ref is not None:
                keep = None
                if not restricted:
                    keep = controller.reference_key_mask(_layer_size(controller.latent_size, layer, key.shape[2]))
                target_out = F.scaled_dot_product_attention(_take(query, rows), _per_half(ref["k"], n),
                                                            _per_half(ref["v"], n), attn_mask=keep)
        if target_out is None or (rows.start == 0 and rows.stop == query.shape[0]):
            return target_out if target_out is not None else out, here
        out[rows] = target_out
        return out, here

    def _lend_and_blend(self, controller: AttentionController, here: dict, out: torch.Tensor | None,
                        device) -> torch.Tensor:
        """Hand this call's sources (with their layer outputs) to the recorder and the step's store, then
        give the target the layout's output ("qkv" swap) or blend it in: h_T <- M * h_T + (1 - M) * h_L."""
        layer, plan = self.layer, controller.plan
        for rows in here.values():
            rows.tensors["out"] = out
        if controller.recorder is not None:
            for role, rows in here.items():
                controller.recorder(controller, layer, role, rows)
        target = controller.paths.get(TARGET)
        if target is None:
            controller.store.update({(layer.name, role): rows for role, rows in here.items()})
            return out
        early, blend = controller.early_swap_active(), controller.blend_active(layer)
        swap_out = early and plan.early_swap == "qkv"
        if not (swap_out or blend):
            return out
        layout = controller.source(layer, LAYOUT, device, here)[0]
        if layout is None:
            return out
        rows = target.rows
        whole = out is None or (rows.start == 0 and rows.stop == out.shape[0])
        target_out = layout["out"] if swap_out else _take(out, rows)
        if blend:
            mask = controller.blend_mask(_layer_size(controller.latent_size, layer, target_out.shape[1]), target_out)
            if mask is not None:
                target_out = torch.lerp(layout["out"], target_out, mask)
        if whole:
            return target_out
        out[rows] = target_out
        return out


def _project(attn, hidden_states, context, self_attention: bool):
    """Query, key and value, in one matmul where the layer's projections are fused (ModelPair.fuse_qkv_projections).

    An adapter wrapped around a projection after fusing (a LoRA) would not reach the fused weights: such
    a layer projects separately.
    """
    if getattr(attn, "fused_projections", False) and all(
            type(getattr(attn, name)) is torch.nn.Linear for name in ("to_q", "to_k", "to_v")):
        if self_attention and hasattr(attn, "to_qkv"):
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        if not self_attention and hasattr(attn, "to_kv"):
            return (attn.to_q(hidden_states), *attn.to_kv(context).chunk(2, dim=-1))
    return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)


def _project_out(attn, outs: list[torch.Tensor | None], dtype: torch.dtype) -> list[torch.Tensor | None]:
    """Each part's attention (rows, heads, tokens, head dim) through the output projection, in one matmul where
    a call's parts all have one (None stays None: a part whose output a swap replaces)."""
    flat = [None if o is None else o.transpose(1, 2).reshape(o.shape[0], -1, o.shape[1] * o.shape[3]).to(dtype)
            for o in outs]
    if len(flat) > 1 and all(o is not None for o in flat):
        whole = attn.to_out[1](attn.to_out[0](torch.cat(flat)))
        return list(whole.split([o.shape[0] for o in flat]))
    return [None if o is None else attn.to_out[1](attn.to_out[0](o)) for o in flat]


def _per_half(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """A source with one row per half (the reference), repeated for the target's n rows per half."""
    if tensor.shape[0] == 2 * n:
        return tensor
    return tensor.repeat_interleave(n // (tensor.shape[0] // 2), dim=0)


def _plain_attention(query, key, value, skipped: slice | None) -> torch.Tensor | None:
    """SDPA over the batch, leaving the `skipped` rows uncomputed (their output is replaced).

    None when every row is skipped (a call of the target alone).
    """
    if skipped is None:
        return F.scaled_dot_product_attention(query, key, value)
    batch = query.shape[0]
    if skipped.start == 0 and skipped.stop == batch:
        return None
    # laid out as SDPA lays out its output (tokens before heads), so the processor's reshape stays a view
    out = query.new_empty((batch, query.shape[2], query.shape[1], value.shape[-1])).transpose(1, 2)
    for rows in (slice(0, skipped.start), slice(skipped.stop, batch)):
        if rows.stop > rows.start:
            out[rows] = F.scaled_dot_product_attention(query[rows], key[rows], value[rows])
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
        batch_maps=config.batch_subject_maps,
        target_from=config.target_start_step,
    )
