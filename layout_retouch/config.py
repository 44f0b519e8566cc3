"""Every hyperparameter of Layout-and-Retouch in one place, with the paper's defaults.

Sources: "paper" is Kim, Seo et al., arXiv 2407.09779; "MasaCtrl" is Cao et al., ICCV 2023;
"DreamMatcher" is Nam et al., CVPR 2024; "[choice]" marks a value the paper does not state
(see docs in ALGORITHM.md), kept as a named parameter rather than a literal in the code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from layout_retouch.errors import LayoutRetouchError

Method = Literal["I", "II", "III", "IV", "V", "freeu", "magicfusion", "dreammatcher"]
# The paper's Tables 1-2 baselines (layout_retouch/baselines/): each a plug-in on plain personalized sampling.
BASELINES = ("freeu", "magicfusion", "dreammatcher")

METHOD_NAMES: dict[str, Method] = {
    "I": "I", "personalized": "I", "plain": "I",
    "II": "II", "step-blend": "II", "layout": "II",
    "III": "III", "single-pass": "III", "masactrl": "III",
    "IV": "IV", "multi-source": "IV", "no-mask": "IV",
    "V": "V", "full": "V", "layout-retouch": "V",
    "freeu": "freeu", "magicfusion": "magicfusion", "dreammatcher": "dreammatcher",
}

# The performance switches below, off: the straightforward implementation of the spec, which every
# optimization must reproduce (tests/test_performance.py, benchmarks/speed.py, benchmarks/gpu_checks.py).
STRAIGHTFORWARD: dict[str, bool] = dict(record_layout_features=False, cache_reference_features=False,
                                        skip_replaced_attention=False, share_inversion_calls=False,
                                        batch_subject_maps=False, pipeline_stages=False, truncate_inversion=False,
                                        defer_reference_reconstruction=False)


@dataclass
class LayoutRetouchConfig:
    """Hyperparameters of both stages; `method` picks the ablation row of the paper's Table 4."""

    # --- ablation row (paper, Table 4): I plain personalized, II + step-blending, III + single-pass
    # reference swap, IV + multi-source swap, V + adaptive mask blending (the full method). Or one of the
    # paper's baselines on plain personalized sampling: freeu, magicfusion, dreammatcher (Tables 1-2).
    method: Method = "V"

    # --- sampling (paper sec. 4 / diffusers SD 1.x defaults)
    num_inference_steps: int = 50  # paper: DDIM 50 steps
    guidance_scale: float = 7.5  # paper: CFG 7.5 (DreamMatcher's evaluation uses 10)
    eta: float = 0.0  # DDIM, deterministic (paper)
    height: int | None = None  # None: the UNet's training resolution (512 for SD 1.x)
    width: int | None = None

    # --- Stage 1: step-blended denoising
    # T_l, vanilla steps: paper uses 5 of 50 for normal prompts and an unstated larger value for
    # challenging ones [choice: expose; sweep 5/10/15]. An int is a step count, a float in [0, 1]
    # a fraction of num_inference_steps.
    vanilla_steps: int | float = 0.1  # = 5 of 50 steps (paper), as a fraction so other step counts scale

    # --- Stage 2: multi-source attention swap
    # S_ref: steps before it take the layout's self-attention map, steps from it on take the
    # reference's keys/values (paper: 4, following MasaCtrl's start step).
    ref_start_step: int = 4
    # [choice] the paper names two swapped variables without symbols: "map" swaps the attention
    # map (layout Q,K; target V, Photoswap-style), "qkv" swaps Q, K and V outright.
    early_swap: Literal["map", "qkv"] = "map"
    # L_ref: decoder self-attention layers at or above this fraction of the latent resolution take
    # the reference's K,V (SD 1.x: 1/2 and 1/1, i.e. call-order blocks 10-15; paper: l >= 10).
    ref_min_resolution: float = 0.5
    # Optional explicit call-order indices overriding the rule above (None: use the rule).
    ref_layer_indices: tuple[int, ...] | None = None
    # Restrict the reference's keys to its subject (MasaCtrl's masked mutual self-attention); the
    # reference mask is its own subject cross-attention, min-max normalized and thresholded here
    # [choice: same value as tau].
    ref_subject_only: bool = True
    ref_mask_threshold: float = 0.1
    # [choice] the layout path's latents: "replay" the Stage 1 trajectory exactly (spec), or
    # "invert" the decoded layout image with DDIM as the paper may have done.
    layout_source: Literal["replay", "invert"] = "replay"
    # The target's prompt (spec: the neutral P_n). "layout" makes the target take the layout's
    # prompt and model at each step: with no control it then reproduces the layout (a test).
    target_prompt: Literal["neutral", "personalized", "layout"] = "neutral"
    # [choice, not the paper's] Where the target path begins (IV, V). "noise" (spec): the layout's initial noise
    # z_T, its own steps from the first, the early swap giving it the layout's structure. "layout": the layout's
    # latent after Stage 1's vanilla steps, z_{T_l}, its own steps from T_l on: its structure is the layout's
    # from the start, and an early swap before T_l has nothing left to do. For a personalized model whose own
    # placement the layout's attention cannot move (the toy world's DreamBooths, issue 14's P1b).
    target_start: Literal["noise", "layout"] = "noise"

    # --- adaptive mask blending
    # S_mask: first step of mask blending [choice: S_mask = S_ref].
    mask_start_step: int | None = None
    # [choice] layers that blend: same rule as the reference swap unless given.
    mask_min_resolution: float | None = None
    # Cross-attention layers that make M_ca, as a fraction of the latent resolution (paper: the
    # 16x16 layers of SD 1.x at 512 px, i.e. 1/4; a small UNet may need 1/2).
    mask_attention_resolution: float = 0.25
    tau: float = 0.1  # M_ca threshold after min-max normalization (MasaCtrl: 0.1)
    min_component_area: float = 0.01  # a_min, fraction of the image [choice: 1%]
    # Segmenter for M_sam: "sam" (Segment Anything through transformers), "none" (cross-attention
    # only) or a name registered by an extension (the toy world registers "toy").
    segmenter: str = "sam"
    sam_model: str = "facebook/sam-vit-base"  # issue: SAM ViT-B through transformers

    # --- reference inversion (paper: DDIM inversion, empty prompt, no guidance, same timesteps)
    inversion_prompt: str = ""
    inversion_cache_dir: str | None = None  # None: ~/.cache/layout_retouch/inversions

    # --- performance (benchmarks/README.md). Each switch gives the same images as the straightforward
    # implementation up to float rounding; switched off, Stage 2 recomputes its sources every step.
    # Stage 1's UNet passes keep what the target borrows from the layout (early Q/K, blend-layer
    # outputs, both CFG halves), so Stage 2 does not run the layout path again...
    record_layout_features: bool = True
    # ...when they fit in this many MiB (None: no limit); otherwise the layout path runs again. [choice: 8 GiB
    # holds 4 seeds of SD 1.x at 512 px in fp16 (5.4 GiB), which then wait in host memory; see below]
    layout_feature_budget_mb: float | None = 8192
    # The reference path's K/V on its subject, per step and reference layer, recorded in the first Stage 2
    # of a concept and reused for every later prompt and seed (the key: model weights, reference latents,
    # prompt, schedule, size, layers)...
    cache_reference_features: bool = True
    # ...when their upper-bound size fits in this many MiB (None: no limit); otherwise recomputed per call.
    reference_feature_budget_mb: float | None = 4096
    # Where recorded features wait on an accelerator: True host memory (copied back when used), False its
    # own memory, "auto" its own memory within device_feature_budget_mb (the reference first), the rest
    # in host memory. Issue 6's goal is peak memory within 1.5x plain sampling; plain SD 1.x at 512 px in
    # fp16 holds 5.7-6.0 GiB on an H100 (benchmarks/README.md), so 2 GiB of features keeps within it.
    feature_offload: bool | Literal["auto"] = "auto"
    device_feature_budget_mb: float | None = 2048
    # Skip the target's own self-attention where a swap replaces it.
    skip_replaced_attention: bool = True
    # The reference's DDIM inversion (when not cached on disk) takes its steps inside Stage 1's UNet calls,
    # a timestep per batch row: a concept's first image costs T_l inversion calls instead of T.
    share_inversion_calls: bool = True
    # Free each step's recorded layout features once Stage 2 has used them (they serve one target), so the
    # final VAE decode and the later steps do not hold them; False keeps them all until the call returns.
    release_used_features: bool = True
    # torch.compile the UNets before the first call that asks (False: eager; True or a torch.compile mode, e.g.
    # "max-autotune-no-cudagraphs"). The method's attention processor runs eagerly inside the compiled UNet (its
    # control changes with the step, which would otherwise recompile it step after step); the rest is compiled.
    compile_unet: bool | str = False
    # The subject maps of a UNet call's map layers in one batched matmul and softmax when first read, not
    # layer by layer: about 60 fewer operators per call (kernel launches on a GPU), the same maps.
    batch_subject_maps: bool = True
    # Pipeline the stages: Stage 2's steps before S_mask (which need no mask, so not the final layout) ride in
    # Stage 1's UNet calls on the same model, each a step behind the layout step it borrows from (a timestep per
    # row); only the steps from S_mask on, and any that cannot ride, take calls of their own. The same images.
    pipeline_stages: bool = True
    # Invert the reference only as deep as this call's Stage 2 reads it: from the clean latent up to S_ref's
    # latent where its features are recorded (none deeper where they are cached already; all the way to z_T
    # where maps are saved or the reference runs every step). The truncated trajectory is cached on disk and a
    # later call that reads deeper extends it from its deepest latent (inversion is sequential: the same
    # latents as a full inversion). S_ref steps fewer per concept (at 10 steps, 4 of 10 inversion rows).
    truncate_inversion: bool = True
    # VAE-decode the reference's reconstruction (`output.reference_reconstruction`, a diagnostic image) when it is
    # first read, not in every call: a VAE decode per concept (about 2.4 UNet rows of SD 1.5) that the CLI
    # spends only with --save-intermediates and the web app only when masks are shown. The same image.
    defer_reference_reconstruction: bool = True

    # Baselines' hyperparameters that differ from their defaults, per baseline: {"freeu": {"b1": 1.5}}; the
    # defaults and their sources are in each baseline's config dataclass (layout_retouch/baselines/).
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)

    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes saved with outputs

    def __post_init__(self) -> None:
        self.method = resolve_method(self.method)
        if self.num_inference_steps < 1:
            raise LayoutRetouchError("num_inference_steps must be at least 1")
        v = self.vanilla_steps
        if isinstance(v, float) and not 0.0 <= v <= 1.0:
            raise LayoutRetouchError(f"vanilla_steps as a fraction must lie in [0, 1], got {v}")
        if isinstance(v, int) and not 0 <= v <= self.num_inference_steps:
            raise LayoutRetouchError(
                f"vanilla_steps={v} must lie in [0, num_inference_steps={self.num_inference_steps}]"
            )
        if not 0.0 <= self.tau < 1.0:
            raise LayoutRetouchError(f"tau must lie in [0, 1), got {self.tau}")
        if self.target_start not in ("noise", "layout"):
            raise LayoutRetouchError(f"target_start must be 'noise' or 'layout', got {self.target_start!r}")
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            raise LayoutRetouchError(f"unknown baselines in `baselines`: {', '.join(unknown)}; "
                                     f"choose from {', '.join(BASELINES)}")
        if self.feature_offload not in (True, False, "auto"):
            raise LayoutRetouchError(f"feature_offload must be true, false or 'auto', got {self.feature_offload!r}")

    # Derived values: one place that turns the config into step counts and layer rules.
    @property
    def num_vanilla_steps(self) -> int:
        """T_l as a step count."""
        if self.method == "I" or self.is_baseline:
            return 0
        v = self.vanilla_steps
        return round(v * self.num_inference_steps) if isinstance(v, float) else v

    @property
    def target_start_step(self) -> int:
        """The first step the target takes itself: T_l where it starts from the layout, else 0."""
        return self.num_vanilla_steps if self.target_start == "layout" and self.uses_layout_path else 0

    @property
    def mask_start(self) -> int:
        return self.ref_start_step if self.mask_start_step is None else self.mask_start_step

    @property
    def blend_min_resolution(self) -> float:
        return self.ref_min_resolution if self.mask_min_resolution is None else self.mask_min_resolution

    @property
    def is_baseline(self) -> bool:
        return self.method in BASELINES

    @property
    def uses_reference(self) -> bool:
        """Whether a reference photo is needed (rows III-V, and DreamMatcher)."""
        return self.method in ("III", "IV", "V", "dreammatcher")

    @property
    def uses_layout_path(self) -> bool:
        return self.method in ("IV", "V")

    @property
    def uses_mask_blending(self) -> bool:
        return self.method == "V"

    def replace(self, **changes: Any) -> LayoutRetouchConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayoutRetouchConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise LayoutRetouchError(f"unknown config keys: {', '.join(unknown)}")
        if data.get("ref_layer_indices") is not None:
            data = {**data, "ref_layer_indices": tuple(data["ref_layer_indices"])}
        return cls(**data)


def resolve_method(name: str) -> Method:
    """Map `I`..`V` or a descriptive name (e.g. `full`, `step-blend`) to the Table 4 id."""
    key = str(name).strip()
    method = METHOD_NAMES.get(key) or METHOD_NAMES.get(key.upper()) or METHOD_NAMES.get(key.lower())
    if method is None:
        choices = ", ".join(sorted(METHOD_NAMES))
        raise LayoutRetouchError(f"unknown method {name!r}; choose one of: {choices}")
    return method
