"""What the layout and reference paths lend the target, recorded once instead of recomputed.

The straightforward Stage 2 runs the layout and the reference through the UNet beside the target at
every step, only to read their self-attention tensors. Both are replays: the layout path is Stage 1's
trajectory through Stage 1's models and prompts, so Stage 1's own UNet passes already computed its
tensors; the reference path depends only on the concept (model, photo, schedule, size), so its
tensors serve every prompt and seed. Recording them gives the same images (up to float rounding from
other batch shapes) at the cost of memory, which a budget bounds; over budget, the paths run again.

What the target needs, per step k, layer and CFG half (the target's unconditional half borrows from
the sources' unconditional halves, so both halves are kept; dropping one would change the result):
- layout, steps k < S_ref, every self-attention layer: Q, K (early "map" swap) or the output ("qkv");
- layout, steps k >= S_mask, blend layers: the self-attention output h_L;
- reference, steps k >= S_ref, reference layers: K, V restricted to the reference's subject keys (the
  key mask is applied by dropping keys, which is what a -inf mask does to softmax).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from layout_retouch.attention_control import LAYOUT, REFERENCE, ControlPlan, _layer_size
from layout_retouch.errors import LayoutRetouchError
from layout_retouch.layers import LayerInfo, attention_layers

MIB = 2**20


@dataclass
class SourceFeatures:
    """Per (step, layer) tensors of one source path, rows: its unconditional half, then its conditional.

    Kept where they were computed, or on `store_device` (host memory) and copied back when used.
    """

    entries: dict[tuple[int, str], dict[str, torch.Tensor]] = field(default_factory=dict)
    store_device: torch.device | None = None  # None: keep where computed; "cpu": host offload
    maps: list[torch.Tensor] = field(default_factory=list)  # the path's per-step subject maps (intermediates)
    keys_restricted: bool = False  # keys already limited to the subject: no key mask to apply
    single_use: bool = False  # read by one Stage 2 only (the layout's): each step's entries go once it is done

    def release_before(self, step: int) -> None:
        """Free the entries of the steps before `step` (single-use features: their step is done)."""
        if self.single_use:
            for key in [key for key in self.entries if key[0] < step]:
                del self.entries[key]

    def put(self, step: int, layer: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.store_device is not None:
            tensors = {k: v.to(self.store_device, non_blocking=True) for k, v in tensors.items()}
        self.entries[(step, layer)] = tensors

    def get(self, step: int, layer: str, device: torch.device) -> dict[str, torch.Tensor] | None:
        found = self.entries.get((step, layer))
        if found is None or self.store_device is None:
            return found
        return {k: v.to(device, non_blocking=True) for k, v in found.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self.entries.values() for t in e.values())


class LayoutRecorder:
    """Called by Stage 1's processors: keeps the layout tensors Stage 2's plan will ask for.

    Where a call holds the layout's rows alone, what is kept is the call's own tensors, not copies; where
    the reference's inversion rides along, copies of the layout's rows (the inversion's are not kept).
    """

    def __init__(self, plan: ControlPlan, store_device: torch.device | None = None, release: bool = True):
        self.plan = plan
        self.features = SourceFeatures(store_device=store_device, single_use=release)

    def __call__(self, controller, layer: LayerInfo, role: str, tensors) -> None:
        if role != LAYOUT:
            return
        step, plan, kept = controller.step, self.plan, {}
        if plan.early_at(step):
            if plan.early_swap == "qkv":
                kept["out"] = tensors.own("out")
            else:
                kept.update(q=tensors.own("q"), k=tensors.own("k"))
        if plan.blend_at(step, layer.name):
            kept["out"] = tensors.own("out")
        if kept:
            self.features.put(step, layer.name, kept)


class ReferenceRecorder:
    """Called where the reference path runs: keeps K, V on the reference's subject at reference layers."""

    def __init__(self, plan: ControlPlan, store_device: torch.device | None = None, key: str = "", start: int = 0):
        self.plan = plan
        self.features = SourceFeatures(store_device=store_device, keys_restricted=True)
        self.key = key  # what the features are computed from (the cache's key)
        self.start = start  # the first step the reference path must run for them
        self._kept: tuple[torch.Tensor, torch.Tensor] | None = None  # the last key mask and its indices

    def __call__(self, controller, layer: LayerInfo, role: str, tensors) -> None:
        if role != REFERENCE or not self.plan.reference_at(controller.step, layer.name):
            return
        keep = controller.reference_key_mask(_layer_size(controller.latent_size, layer, tensors["k"].shape[2]))
        if keep is None:
            k, v = tensors.own("k"), tensors.own("v")
        else:  # dropping masked keys is what the -inf mask does to the softmax (index_select copies)
            if self._kept is None or self._kept[0] is not keep:  # the controller makes one mask per step and size
                self._kept = (keep, keep.flatten().nonzero().flatten())
            index = self._kept[1]
            k, v = tensors["k"].index_select(2, index), tensors["v"].index_select(2, index)
        self.features.put(controller.step, layer.name, {"k": k, "v": v})


# --- memory estimates, made before anything is recorded
def _self_attention_sizes(unet, latent_size: tuple[int, int]) -> dict[str, tuple[int, int, int, int]]:
    """layer name -> (tokens, q, k, v widths, layer output width after to_out) of every self-attention layer."""
    sizes = {}
    for layer in attention_layers(unet):
        if layer.cross:
            continue
        module = unet.get_submodule(layer.name)
        h = max(1, round(latent_size[0] * layer.resolution))
        w = max(1, round(latent_size[1] * layer.resolution))
        sizes[layer.name] = (h * w, module.to_q.out_features, module.to_k.out_features, module.to_v.out_features,
                             module.to_out[0].out_features)
    return sizes


def layout_feature_bytes(plan: ControlPlan, unet, latent_size, steps: int, images: int, element_size: int) -> int:
    """Bytes the layout recorder will keep for `images` layouts of `steps` steps (both CFG halves)."""
    total = 0
    for name, (tokens, dq, dk, _, d_out) in _self_attention_sizes(unet, latent_size).items():
        for step in range(steps):
            width = 0
            if plan.early_at(step):
                width += d_out if plan.early_swap == "qkv" else dq + dk
            if plan.blend_at(step, name):
                width += d_out
            total += tokens * width
    return total * 2 * images * element_size


def reference_feature_bytes(plan: ControlPlan, unet, latent_size, steps: int, element_size: int) -> int:
    """Upper bound (all keys kept) of the reference recorder's bytes for one reference (both halves)."""
    total = 0
    for name, (tokens, _, dk, dv, _) in _self_attention_sizes(unet, latent_size).items():
        total += tokens * (dk + dv) * sum(plan.reference_at(step, name) for step in range(steps))
    return total * 2 * element_size


def fits(nbytes: int, budget_mb: float | None) -> bool:
    return budget_mb is None or nbytes <= budget_mb * MIB


HOST = torch.device("cpu")


def feature_homes(offload: bool | str, device: torch.device, reference_bytes: int, layout_bytes: int,
                  device_budget_mb: float | None) -> tuple[torch.device | None, torch.device | None]:
    """Where the recorded reference and layout features live: None (the device that computed them) or host.

    "auto" keeps them in an accelerator's memory within `device_budget_mb`, the reference first (it serves
    every image of the concept), and sends the rest to host memory, to be copied back step by step.
    `reference_bytes` counts only what the device would hold. On a CPU "auto" has nowhere else to go.
    """
    if offload is True:
        return HOST, HOST
    if offload is not False and offload != "auto":
        raise LayoutRetouchError(f"feature_offload must be true, false or 'auto', got {offload!r}")
    if offload is False or torch.device(device).type == "cpu":
        return None, None
    room = float("inf") if device_budget_mb is None else device_budget_mb * MIB
    reference_home = None if reference_bytes <= room else HOST
    if reference_home is None:
        room -= reference_bytes
    return reference_home, None if layout_bytes <= room else HOST


# --- cache keys
def tensor_digest(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def weights_signature(*modules: torch.nn.Module) -> str:
    """Changes whenever a weight is replaced or edited in place (storage, version counter, a sample of values)."""
    digest = hashlib.sha256()
    samples = []
    for module in modules:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            digest.update(f"{name}|{tensor.data_ptr()}|{tensor._version}|{tuple(tensor.shape)}|{tensor.dtype}|"
                          f"{tensor.device}".encode())
            samples.append(tensor.as_strided((min(8, tensor.numel()),), (1,)))  # one view op per tensor
    if samples:  # one copy to the host for all of them, not one per tensor
        digest.update(torch.cat(samples).float().cpu().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class ReferenceFeatureCache:
    """The reference features of the last concept, with the key that says what they were computed from."""

    key: str | None = None
    features: SourceFeatures | None = None
    reconstruction_key: str | None = None
    reconstruction: object = None  # the decoded reconstruction of the reference (a PIL image)
    computed: int = 0  # how many times features were computed since the last clear (tests read it)

    def lookup(self, key: str) -> SourceFeatures | None:
        return self.features if key == self.key else None

    def keep(self, key: str, features: SourceFeatures) -> None:
        self.key, self.features = key, features
        self.computed += 1

    def clear(self) -> None:
        self.key = self.features = self.reconstruction_key = self.reconstruction = None
        self.computed = 0
