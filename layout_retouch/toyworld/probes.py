"""Probes: does a toy world's UNet route structure and appearance through self-attention, as SD does?

Stage 2 acts on self-attention only (ALGORITHM.md), so it can work in a world only where self-attention
carries the layout (P1, P1b, P2) and the subject's look (P3), where every transformer block does work
(P4), and where the adaptive mask finds the subject (P5). Each probe is one number over seeds with a
bootstrap interval, measured by the toy world's oracles; `layout-retouch toy-probes` runs them.

- P1 structure: vanilla model, prompts A and B differing only in the scene, B from other noise than A;
  A's self-attention Q, K injected into B in every self-attention layer over the first half of the
  steps (the method's early "map" swap): median subject-center distance B to A, with and without;
  also with A's whole self-attention layer outputs in place of B's (the "qkv" swap, an upper bound), and
  with the Q, K of A's finished image on every step ("settled": A's place is decided in its first two or
  three steps, while its maps at those steps hardly single the subject out; this tells a map that comes
  too early from one that cannot carry place at all).
- P1b the method's own case: the DreamBooth target from P_n and the layout's noise, the layout's Q, K in
  every self-attention layer over the first half: median distance of the target's subject to the layout's;
  also with the layout's Q, K, V ("qkv") and with the Q, K of the finished layout image on every step of the
  first half ("settled", P1's settled source in the method's case; not the paper's rule).
- P2 blend bound: Stage 2 with M = 0 (the target takes the layout's self-attention layer outputs) in the
  paper's blend layers, and in every self-attention layer: share of targets whose scene is the layout's
  (and, for comparison, of targets with no control at all).
  P1b and P2 take layouts made with half the steps on the vanilla model, which vary where the subject
  sits and which scene surrounds it (at T_l = 0.1 the toy DreamBooth's layouts are its studio picture).
- P3 appearance: row III's rule (MasaCtrl's mutual self-attention, target Q on the source's subject K, V)
  from a source of one color into a target prompt without a color word, from other noise.
- P4 what each transformer block adds to the feature map it sits on, |out - in| / |in|.
- P5 mask quality: the layout is a DDIM-inverted render, whose true subject mask the renderer knows;
  IoU, precision and recall of M_ca, M_sam, their union and the final M against it, per step.
- P6 routing, a diagnostic without a bar: where does the subject's place enter the UNet? P1's pair with no
  attention control; B takes A's outputs of one kind of module (self-attention, cross-attention, or the
  resnets, i.e. the residual stream) at one resolution over the first half of the steps: median distance
  B to A for each. A kind and level that carries the place pulls B's subject onto A's.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from layout_retouch.attention_control import LAYOUT, REFERENCE, TARGET, AttentionController, ControlPlan
from layout_retouch.conditioning import Conditioning, PromptEncoder
from layout_retouch.config import LayoutRetouchConfig
from layout_retouch.layers import attention_layers, select_decoder_layers, select_map_layers
from layout_retouch.sampling import PathInput, attention_control, guided_eps
from layout_retouch.stage1_layout import LayoutTrajectory, step_blended_denoise
from layout_retouch.stage2_retouch import MaskBuilder, RetouchConditioning, retouch
from layout_retouch.toyworld.bench_stats import BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED, percentile_interval
from layout_retouch.toyworld.scene import CLASSES, SCENES
from layout_retouch.toyworld.world import CLASS_WORD, DREAMBOOTH, ORACLES, TOKEN, TOY_METHOD, TOY_MODELS, VANILLA

OTHER_NOISE = 500  # B's seed is A's + this: the structure must come through attention, not the noise
# Prompt pairs of P1 (A, B differ in the scene only) and the scenes of P1b/P2; cycled over the seeds.
P1_PAIRS = (("red", "star", "beach", "snow"), ("blue", "ball", "grass", "night"),
            ("yellow", "box", "water", "brick"), ("green", "cone", "snow", "beach"))
CONTEXT_SCENES = ("night", "snow", "beach", "grass")
P3_COLORS = ("red", "blue", "yellow", "green", "orange", "purple")


@dataclass
class ProbeSettings:
    models: Path = TOY_MODELS  # a toy world's models folder: vanilla/, sks_star_dreambooth/ (optional)
    seeds: int = 16  # issue 14: intervals over at least 16 seeds
    steps: int = 30  # DDIM steps (the toy world's quality report samples with 30)
    guidance: float = 5.0  # CFG of the toy world's quality report
    probes: tuple[str, ...] = ("P1", "P1b", "P2", "P3", "P4", "P5", "P6", "P6b")
    # The personalized model's folder in `models` (P1b, P2, P5, P6b): the DreamBooth, or a LoRA folder.
    personalized: str = DREAMBOOTH


# ------------------------------------------------------------------ statistics
def interval(values, statistic: Callable[[np.ndarray], float] = np.median) -> dict:
    """The statistic over seeds, with a percentile-bootstrap interval (resampling the seeds)."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    samples = [statistic(values[rng.integers(0, len(values), len(values))]) for _ in range(BOOTSTRAP_SAMPLES)]
    found = percentile_interval(statistic(values), np.asarray(samples))
    return {"value": found["mean"], "ci_low": found["ci_low"], "ci_high": found["ci_high"], "n": int(len(values))}


def distance(a: tuple[float, float], b: tuple[float, float]) -> float:
    return float(np.hypot(a[0] - b[0], a[1] - b[1]))


# ------------------------------------------------------------------ running two paths in lockstep
class World:
    """A toy world's models loaded once: the method's model pair, the oracles."""

    def __init__(self, models: Path, personalized: str = DREAMBOOTH):
        from layout_retouch.pipeline import LayoutRetouchPipeline
        from layout_retouch.toyworld.oracles import ORACLE_DIR, Oracles

        self.models = Path(models)
        tuned = self.models / personalized
        self.has_personalized = any((tuned / name).exists() for name in ("personalization.json", "model_index.json",
                                                                         "unet"))
        self.pipe = LayoutRetouchPipeline.from_pretrained(
            str(self.models / VANILLA), personalized=str(tuned) if self.has_personalized else None,
            token=TOKEN if self.has_personalized else None, class_word=CLASS_WORD, progress=False)
        oracles = self.models / ORACLES
        self.oracles = Oracles.load(oracles if (oracles / "locator.safetensors").exists() else ORACLE_DIR)
        self.pair = self.pipe.models
        self.latent_shape = (self.pair.pipe.unet.config.in_channels,
                             *(s // self.pipe.vae_scale_factor for s in self.pipe.default_size()))
        self.prompts = PromptEncoder(self.pair, self.pipe.default_size())

    def conditioning(self, text: str, personalized: bool, subject: tuple[str, ...] = ()) -> Conditioning:
        from layout_retouch.prompts import subject_token_indices

        tokens = subject_token_indices(self.pair.tokenizer, text, list(subject)) if subject else []
        return self.prompts.guided(text, personalized, tokens)

    def noise(self, seed: int) -> torch.Tensor:
        return torch.randn((1, *self.latent_shape), generator=torch.Generator().manual_seed(seed))

    def timesteps(self, steps: int) -> torch.Tensor:
        self.pair.scheduler.set_timesteps(steps)
        return self.pair.scheduler.timesteps

    def decode(self, latents: torch.Tensor):
        return self.pipe.decode(latents, "pil")

    def read(self, latents: torch.Tensor):
        return self.oracles.read(self.decode(latents))

    def self_attention_layers(self) -> set[str]:
        return {layer.name for layer in attention_layers(self.pair.pipe.unet) if not layer.cross}

    @torch.no_grad()
    def lockstep(self, source: PathInput, target: PathInput, plan: ControlPlan, timesteps, guidance: float,
                 controller: AttentionController | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Denoise a source and a target side by side (each its own DDIM steps) under `plan`.

        A source with a `timestep` is replayed instead: the same latents at that timestep on every step."""
        controller = controller or AttentionController(plan, latent_size=self.latent_shape[1:])
        scheduler = self.pair.scheduler
        src, tgt = source.latents, target.latents
        replayed = source.timestep is not None
        with attention_control(self.pair.unets(), controller):
            for k, t in enumerate(timesteps):
                controller.begin_step(k)
                paths = [PathInput(source.role, src, source.personalized, source.conditioning, wants_eps=not replayed,
                                   timestep=source.timestep),
                         PathInput(TARGET, tgt, target.personalized, target.conditioning, wants_eps=True)]
                eps = guided_eps(self.pair, paths, t, guidance, controller)
                if not replayed:
                    src = scheduler.step(eps[source.role], t, src).prev_sample
                tgt = scheduler.step(eps[TARGET], t, tgt).prev_sample
            controller.finish_step()
        return src, tgt


def early_map_plan(steps: int) -> ControlPlan:
    """The method's early swap (the layout's Q, K on the target's V) in every self-attention layer, over
    the first half of the steps; nothing after."""
    return ControlPlan(early_swap="map", ref_start=steps // 2)


# ------------------------------------------------------------------ the probes
def groups(seeds: list[int], count: int) -> list[tuple[int, list[int]]]:
    """Seeds dealt round-robin to `count` prompt variants: (variant, its seeds), each run as one batch."""
    return [(v, seeds[v::count]) for v in range(count) if seeds[v::count]]


def noises(world: World, seeds: list[int], offset: int = 0) -> torch.Tensor:
    return torch.cat([world.noise(seed + offset) for seed in seeds])


def probe_p1(world: World, s: ProbeSettings, seeds: list[int]) -> dict:
    timesteps = world.timesteps(s.steps)
    injected, baseline, scene_kept, outputs, settled = [], [], [], [], []
    for variant, batch in groups(seeds, len(P1_PAIRS)):
        color, obj, scene_a, scene_b = P1_PAIRS[variant]
        a = world.conditioning(f"a photo of a {color} {obj} {SCENES[scene_a]}", False)
        b = world.conditioning(f"a photo of a {color} {obj} {SCENES[scene_b]}", False)
        za, zb = noises(world, batch), noises(world, batch, OTHER_NOISE)
        runs = {}
        # "outputs": the source's whole self-attention layer outputs instead of its Q, K (an upper bound)
        outputs_plan = ControlPlan(early_swap="qkv", ref_start=s.steps // 2)
        for name, plan in (("injected", early_map_plan(s.steps)), ("baseline", ControlPlan()),
                           ("outputs", outputs_plan)):
            runs[name] = world.lockstep(PathInput(LAYOUT, za, False, a), PathInput(TARGET, zb, False, b), plan,
                                        timesteps, s.guidance)
        # "settled": A's Q, K taken from its finished image (t = 0) on every step, its place long decided
        finished = PathInput(LAYOUT, runs["baseline"][0], False, a, timestep=torch.tensor(0))
        runs["settled"] = world.lockstep(finished, PathInput(TARGET, zb, False, b), early_map_plan(s.steps),
                                         timesteps, s.guidance)
        n = len(batch)
        readings = world.read(torch.cat([runs["injected"][0], runs["injected"][1], runs["baseline"][1],
                                         runs["outputs"][1], runs["settled"][1]]))
        for i in range(n):
            read_a, read_b, read_base, read_out, read_settled = readings[i::n]
            injected.append(distance(read_b.center, read_a.center))
            baseline.append(distance(read_base.center, read_a.center))
            outputs.append(distance(read_out.center, read_a.center))
            settled.append(distance(read_settled.center, read_a.center))
            scene_kept.append(read_b.scene == scene_b)
    return {"median_center_distance_px": interval(injected), "baseline_median_center_distance_px":
            interval(baseline), "scene_rate": interval(scene_kept, np.mean),
            "output_swap_median_center_distance_px": interval(outputs),
            "settled_source_median_center_distance_px": interval(settled)}


def _stage1(world: World, s: ProbeSettings, batch: list[int], scene: str, config: LayoutRetouchConfig):
    """The layouts of `a photo of a sks star <scene>` and the retouch conditioning (P_v, P_p, P_n)."""
    prompts = world.pipe.derive_prompts(f"a photo of a {TOKEN} {CLASS_WORD} {SCENES[scene]}")
    cond = world.pipe.encode_prompts(prompts)
    timesteps = world.timesteps(s.steps)
    z = noises(world, batch)
    layout = step_blended_denoise(world.pair, z, timesteps, config.num_vanilla_steps, cond.vanilla,
                                  cond.personalized, s.guidance, progress=False)
    return cond, timesteps, z, layout


def _retouch(world: World, config: LayoutRetouchConfig, plan: ControlPlan, cond: RetouchConditioning, z,
             timesteps, layout: LayoutTrajectory, mask_fn=None, reference=None, controller=None) -> torch.Tensor:
    controller = controller or AttentionController(plan, latent_size=world.latent_shape[1:])
    controller.blend_mask_fn = mask_fn
    with attention_control(world.pair.unets(), controller):
        return retouch(world.pair, config, controller, cond, z.clone(), timesteps, layout, reference,
                       progress=False)


def probe_config(s: ProbeSettings, layout_steps: float = 0.1) -> LayoutRetouchConfig:
    """The method's defaults at the probes' step count (S_ref scaled from the paper's 4 of 50), toy settings.

    P1b and P2 judge whether the target can take a layout that differs from what the personalized model
    draws; at the paper's T_l (0.1) the toy DreamBooth's layouts are its own studio picture already, so
    they take half of the steps from the vanilla model (as issue 14's measurements did)."""
    return LayoutRetouchConfig(method="V", num_inference_steps=s.steps, guidance_scale=s.guidance,
                               ref_start_step=round(4 * s.steps / 50), vanilla_steps=layout_steps, **TOY_METHOD)


VARIED_LAYOUT = 0.5  # T_l of P1b and P2, as a share of the steps


def probe_p1b(world: World, s: ProbeSettings, seeds: list[int]) -> dict:
    config = probe_config(s, VARIED_LAYOUT)
    injected, own, outputs, settled = [], [], [], []
    # "outputs": the layout's Q, K and V, not its Q, K alone: the target's attention returns the layout's whole
    # result (an upper bound: can self-attention move the personalized target's subject at all?)
    outputs_plan = ControlPlan(early_swap="qkv", ref_start=s.steps // 2)
    for variant, batch in groups(seeds, len(CONTEXT_SCENES)):
        cond, timesteps, z, layout = _stage1(world, s, batch, CONTEXT_SCENES[variant], config)
        target = _retouch(world, config, early_map_plan(s.steps), cond, z, timesteps, layout)
        alone = _retouch(world, config, ControlPlan(), cond, z, timesteps, layout)
        swapped = _retouch(world, config, outputs_plan, cond, z, timesteps, layout)
        steered = world.lockstep(*settled_layout_paths(layout, cond, z), early_map_plan(s.steps), timesteps,
                                 s.guidance)[1]
        n = len(batch)
        readings = world.read(torch.cat([layout.latents[-1], target, alone, swapped, steered]))
        for i in range(n):
            read_layout, read_target, read_alone, read_swapped, read_steered = readings[i::n]
            injected.append(distance(read_target.center, read_layout.center))
            own.append(distance(read_alone.center, read_layout.center))
            outputs.append(distance(read_swapped.center, read_layout.center))
            settled.append(distance(read_steered.center, read_layout.center))
    return {"median_center_distance_px": interval(injected), "baseline_median_center_distance_px": interval(own),
            "output_swap_median_center_distance_px": interval(outputs),
            "settled_layout_median_center_distance_px": interval(settled)}


def settled_layout_paths(layout: LayoutTrajectory, cond: RetouchConditioning, z: torch.Tensor
                         ) -> tuple[PathInput, PathInput]:
    """P1b's "settled" pair: the finished layout replayed at t = 0 on its last step's model and prompt (the
    personalized model with P_p), and the method's target (the personalized model, P_n, the layout's noise)."""
    finished = PathInput(LAYOUT, layout.latents[-1], True, cond.personalized, timestep=torch.tensor(0))
    return finished, PathInput(TARGET, z, True, cond.neutral)


def _image_rmse(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, float) - np.asarray(b, float)) ** 2)))


def probe_p2(world: World, s: ProbeSettings, seeds: list[int]) -> dict:
    config = probe_config(s, VARIED_LAYOUT)
    unet = world.pair.pipe.unet
    paper = select_decoder_layers(attention_layers(unet), config.blend_min_resolution, config.ref_layer_indices)
    # "no_control": the target from P_n alone, what the blend has to move away from
    layer_sets = {"paper_layers": paper, "all_layers": world.self_attention_layers(), "no_control": None}
    agree = {name: [] for name in layer_sets}
    rmse = {name: [] for name in layer_sets}
    for variant, batch in groups(seeds, len(CONTEXT_SCENES)):
        cond, timesteps, z, layout = _stage1(world, s, batch, CONTEXT_SCENES[variant], config)
        n = len(batch)
        finals = []
        for layers in layer_sets.values():
            plan = ControlPlan() if layers is None else ControlPlan(
                early_swap=config.early_swap, ref_start=config.ref_start_step, mask_start=config.mask_start,
                blend_layers=layers)
            zero = lambda controller, n=n: torch.zeros(n, *world.latent_shape[1:])  # M = 0: the layout's output
            finals.append(_retouch(world, config, plan, cond, z, timesteps, layout, zero))
        images = world.decode(torch.cat([layout.latents[-1], *finals]))
        readings = world.oracles.read(images)
        for j, name in enumerate(layer_sets):
            for i in range(n):
                target = (j + 1) * n + i
                agree[name].append(readings[target].scene == readings[i].scene)
                rmse[name].append(_image_rmse(images[target], images[i]))
    result = {}
    for name in layer_sets:
        result[f"{name}_scene_agreement"] = interval(agree[name], np.mean)
        result[f"{name}_rmse"] = interval(rmse[name], np.mean)
    return result


def probe_p3(world: World, s: ProbeSettings, seeds: list[int]) -> dict:
    config = probe_config(s)
    layers = attention_layers(world.pair.pipe.unet)
    plan = ControlPlan(ref_start=config.ref_start_step,
                       ref_layers=select_decoder_layers(layers, config.ref_min_resolution, config.ref_layer_indices),
                       map_layers=select_map_layers(layers, config.mask_attention_resolution),
                       ref_subject_only=config.ref_subject_only, ref_mask_threshold=config.ref_mask_threshold)
    timesteps = world.timesteps(s.steps)
    transferred, baseline = [], []
    variants = [(color, CLASSES[i % len(CLASSES)], CONTEXT_SCENES[i % len(CONTEXT_SCENES)])
                for i, color in enumerate(P3_COLORS)]
    for i, seed in enumerate(seeds):  # one seed a call: the reference key mask is made from a single source
        batch = [seed]
        color, obj, scene = variants[i % len(variants)]
        source = world.conditioning(f"a photo of a {color} {obj} {SCENES[scene]}", False, (obj,))
        target = world.conditioning(f"a photo of a {obj} {SCENES[scene]}", False, (obj,))
        zs, zt = noises(world, batch), noises(world, batch, OTHER_NOISE)
        finals = {}
        for name, p in (("swap", plan), ("baseline", ControlPlan())):
            finals[name] = world.lockstep(PathInput(REFERENCE, zs, False, source), PathInput(TARGET, zt, False, target),
                                          p, timesteps, s.guidance)
        n = len(batch)
        readings = world.read(torch.cat([finals["swap"][0], finals["swap"][1], finals["baseline"][1]]))
        for read_s, read_t, read_base in zip(readings[:n], readings[n:2 * n], readings[2 * n:], strict=True):
            transferred.append(read_t.color == read_s.color)
            baseline.append(read_base.color == read_s.color)
    return {"color_transfer_rate": interval(transferred, np.mean),
            "baseline_color_match_rate": interval(baseline, np.mean)}


def block_contributions(world: World, s: ProbeSettings, seeds: list[int]) -> dict[str, list[float]]:
    """Per transformer block, per seed: mean over steps of |out - in| / |in| (both CFG halves)."""
    from layout_retouch.toyworld.attention_contribution import transformer_block_hooks

    per_call: dict[str, list[torch.Tensor]] = {}

    def record(name, feature, out):
        feature, out = feature.float(), out.float()
        per_call.setdefault(name, []).append((out - feature).flatten(1).norm(dim=1) / feature.flatten(1).norm(dim=1))

    timesteps = world.timesteps(s.steps)
    with transformer_block_hooks(world.pair.pipe.unet, record):
        cond = world.conditioning("a photo of a red ball on the beach", False)
        z = torch.cat([world.noise(seed) for seed in seeds])
        step_blended_denoise(world.pair, z, timesteps, s.steps, cond, cond, s.guidance, progress=False)
    n = len(seeds)  # rows: the unconditional halves, then the conditional; a seed's value is their mean
    return {name: [float(v) for v in (torch.stack(calls).mean(0).view(2, n).mean(0))]
            for name, calls in per_call.items()}


def probe_p4(world: World, s: ProbeSettings, seeds: list[int]) -> dict:
    blocks = block_contributions(world, s, seeds)
    per_seed_min = np.min(np.array(list(blocks.values())), axis=0)
    return {"min_block_contribution": interval(per_seed_min, np.mean),
            "blocks": {name: round(float(np.mean(v)), 4) for name, v in blocks.items()}}


# P6's kinds of module, by name in a diffusers UNet: each transformer block's self- and cross-attention, and
# the resnets (whose outputs are the residual stream itself).
ROUTES = {"self_attention": r".*transformer_blocks\.\d+\.attn1", "cross_attention": r".*transformer_blocks\.\d+\.attn2",
          "stream": r".*resnets\.\d+"}


def feature_side(output: torch.Tensor) -> int:
    """The side of a module's square feature map: tokens (B, N, C) or channels first (B, C, H, W)."""
    return math.isqrt(output.shape[1] if output.dim() == 3 else output.shape[-1] * output.shape[-2])


@contextmanager
def source_outputs_in_target(unet, pattern: str, side: int, active: Callable[[], bool]) -> Iterator[None]:
    """While `active()`, every module of `unet` named like `pattern` whose feature map is side x side returns,
    for the second half of its batch (the target's rows: `World.lockstep` puts the source's first), the
    first half's output."""
    def hook(module, args, output):
        if not active() or feature_side(output) != side:
            return output
        n = output.shape[0] // 2
        return torch.cat([output[:n], output[:n]])

    handles = [m.register_forward_hook(hook) for name, m in unet.named_modules() if re.fullmatch(pattern, name)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def routed_distances(world: World, s: ProbeSettings, cases: Iterator[tuple[PathInput, PathInput]],
                     swap: Callable[[str, int, Callable[[], bool]], contextlib.AbstractContextManager]) -> dict:
    """P6's and P6b's runs: for each (source, target) case, once plainly and once per route (a kind of module at
    one resolution) with `swap(pattern, side, active)` over the first half of the steps; the median distance of
    the target's subject to the source's, per route."""
    unet = world.pair.pipe.unet
    sides = [world.latent_shape[1] // 2 ** i for i in range(len(unet.config.block_out_channels))]
    timesteps = world.timesteps(s.steps)
    runs = {"baseline": None, **{f"{kind}_{side}": (pattern, side) for kind, pattern in ROUTES.items()
                                 for side in sides}}
    distances: dict[str, list[float]] = {name: [] for name in runs}
    for source, target in cases:
        for name, route in runs.items():
            controller = AttentionController(ControlPlan(), latent_size=world.latent_shape[1:])

            def early(controller=controller):
                return controller.step < s.steps // 2

            with swap(*route, early) if route else contextlib.nullcontext():
                src, tgt = world.lockstep(source, target, ControlPlan(), timesteps, s.guidance, controller)
            readings = world.read(torch.cat([src, tgt]))
            n = len(src)
            distances[name] += [distance(readings[n + i].center, readings[i].center) for i in range(n)]
    return {f"{name}_median_center_distance_px": interval(values) for name, values in distances.items()}


def probe_p6(world: World, s: ProbeSettings, seeds: list[int]) -> dict:
    def cases():
        for variant, batch in groups(seeds, len(P1_PAIRS)):
            color, obj, scene_a, scene_b = P1_PAIRS[variant]
            a = world.conditioning(f"a photo of a {color} {obj} {SCENES[scene_a]}", False)
            b = world.conditioning(f"a photo of a {color} {obj} {SCENES[scene_b]}", False)
            yield (PathInput(LAYOUT, noises(world, batch), False, a),
                   PathInput(TARGET, noises(world, batch, OTHER_NOISE), False, b))

    return routed_distances(world, s, cases(), partial(source_outputs_in_target, world.pair.pipe.unet))


@contextmanager
def vanilla_outputs_in_personalized(vanilla, personalized, pattern: str, side: int | None,
                                    active: Callable[[], bool],
                                    adapt: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                                    ) -> Iterator[None]:
    """While `active()`, every module of the `personalized` UNet named like `pattern` at side x side (any side:
    None) returns what the module of the same name in the `vanilla` UNet returned last (or `adapt(name, vanilla's,
    its own)`). In `World.lockstep` with a vanilla source and a personalized target the source's model runs first,
    one path per call, so the shapes match."""
    kept: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            if active() and (side is None or feature_side(output) == side):
                kept[name] = output
        return hook

    def give(name):
        def hook(module, args, output):
            if not (active() and name in kept):
                return output
            lent = kept.pop(name)
            return lent if adapt is None else adapt(name, lent, output)
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in vanilla.named_modules() if re.fullmatch(pattern, n)]
    handles += [m.register_forward_hook(give(n)) for n, m in personalized.named_modules() if re.fullmatch(pattern, n)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def probe_p6b(world: World, s: ProbeSettings, seeds: list[int]) -> dict:
    """P6 for the method's own case: which module's outputs, taken from a vanilla layout over the first half of
    the steps, bring the DreamBooth target (P_n, the layout's noise) to the layout's subject? P1b's output swap
    says how far the layout's whole attention moves the target; this names where the personalization keeps its place."""
    if world.pair.personal_unet is None:  # an adapter (LoRA) or embedding on the vanilla UNet: nothing to swap
        return {"skipped": "needs a personalized UNet of its own (a DreamBooth), not an adapter on the vanilla one"}

    def cases():
        for variant, batch in groups(seeds, len(CONTEXT_SCENES)):
            scene = SCENES[CONTEXT_SCENES[variant]]
            prompts = world.pipe.derive_prompts(f"a photo of a {TOKEN} {CLASS_WORD} {scene}")
            z = noises(world, batch)
            yield (PathInput(LAYOUT, z, False, world.conditioning(prompts.vanilla, False)),
                   PathInput(TARGET, z, True, world.conditioning(prompts.neutral, True)))

    vanilla, personalized = world.pair.select(False)[0], world.pair.select(True)[0]
    return routed_distances(world, s, cases(), partial(vanilla_outputs_in_personalized, vanilla, personalized))


def probe_p5(world: World, s: ProbeSettings, seeds: list[int]) -> dict:
    """The layout path replays the DDIM inversion of a render of the personal star in a scene (its true mask
    known); the target runs the full method (V) from P_n; its masks are compared with the truth."""
    if not world.has_personalized:
        return {"skipped": "needs the personalized model"}
    from layout_retouch.masks import resize_mask
    from layout_retouch.toyworld.datasets import personal_sample, reference_sample

    config = probe_config(s)
    unet = world.pair.pipe.unet
    layers = attention_layers(unet)
    plan = ControlPlan(early_swap=config.early_swap, ref_start=config.ref_start_step, mask_start=config.mask_start,
                       ref_layers=select_decoder_layers(layers, config.ref_min_resolution, config.ref_layer_indices),
                       blend_layers=select_decoder_layers(layers, config.blend_min_resolution,
                                                          config.ref_layer_indices),
                       map_layers=select_map_layers(layers, config.mask_attention_resolution),
                       ref_subject_only=config.ref_subject_only, ref_mask_threshold=config.ref_mask_threshold)
    timesteps = world.timesteps(s.steps)
    size = world.latent_shape[1:]
    names = ("m_ca", "m_sam", "union", "final")
    scores: dict[str, dict[str, list[list[float]]]] = {m: {"iou": [], "precision": [], "recall": []} for m in names}
    reference = world.pipe.invert_reference(reference_sample(0).pil(), timesteps, config)
    for seed in seeds:
        render = personal_sample(seed)
        prompts = world.pipe.derive_prompts(f"a photo of a {TOKEN} {CLASS_WORD} {SCENES[render.spec.scene]}")
        cond = world.pipe.encode_prompts(prompts)
        inverted = world.pipe.invert_reference(render.pil(), timesteps, config)
        layout = LayoutTrajectory(inverted.latents, timesteps, config.num_vanilla_steps)
        layout_image = world.decode(inverted.latents[-1])
        layout_maps = _run_maps(world, plan, cond, layout, timesteps, s.guidance)
        sam = world.pipe.segment_layouts(layout_image, layout_maps, size, config)
        builder = MaskBuilder(sam, config, size)
        steps_seen: dict[str, list[list[float]]] = {m: [] for m in names}
        truth = resize_mask(torch.from_numpy(render.mask.astype(np.float32))[None], size)[0].numpy() > 0.5

        def record(controller, builder=builder, steps_seen=steps_seen, truth=truth):
            mask = builder(controller)
            if builder.last:
                built = builder.last[0]
                for m in names:
                    steps_seen[m].append(_overlap(np.asarray(getattr(built, m)) > 0, truth))
            return mask

        _retouch(world, config, plan, cond, world.noise(seed), timesteps, layout, record, reference)
        for m in names:
            if steps_seen[m]:
                per_step = np.array(steps_seen[m])  # (steps, 3): iou, precision, recall
                for j, key in enumerate(("iou", "precision", "recall")):
                    scores[m][key].append(per_step[:, j].tolist())
    result: dict = {}
    for m in names:
        if not scores[m]["iou"]:
            continue
        final_step = {key: [v[-1] for v in values] for key, values in scores[m].items()}
        result[m] = {key: interval(vals, np.mean) for key, vals in final_step.items()}
        result[m]["iou_per_step"] = [round(float(x), 4) for x in np.mean(np.array(scores[m]["iou"]), axis=0)]
    if "final" in result:
        result["final_iou"] = result["final"]["iou"]
    return result


def _run_maps(world: World, plan: ControlPlan, cond: RetouchConditioning, layout: LayoutTrajectory, timesteps,
              guidance: float) -> torch.Tensor | None:
    """The layout path's mean subject map over the run (what the pipeline prompts the segmenter with)."""
    recorder = AttentionController(ControlPlan(map_layers=plan.map_layers), latent_size=world.latent_shape[1:])
    with attention_control(world.pair.unets(), recorder):
        for k, t in enumerate(timesteps):
            recorder.begin_step(k)
            guided_eps(world.pair, [PathInput(LAYOUT, layout.latents[k], True, cond.personalized)], t, guidance,
                       recorder)
    return recorder.run_map(LAYOUT)


def _overlap(mask: np.ndarray, truth: np.ndarray) -> list[float]:
    inter = float((mask & truth).sum())
    union = float((mask | truth).sum())
    return [inter / union if union else 1.0, inter / mask.sum() if mask.sum() else 0.0,
            inter / truth.sum() if truth.sum() else 1.0]


PROBES = {"P1": probe_p1, "P1b": probe_p1b, "P2": probe_p2, "P3": probe_p3, "P4": probe_p4, "P5": probe_p5,
          "P6": probe_p6, "P6b": probe_p6b}
NEEDS_PERSONALIZED = {"P1b", "P2", "P5", "P6b"}


@dataclass
class ProbeRun:
    settings: ProbeSettings
    results: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"settings": {**asdict(self.settings), "models": str(self.settings.models)}, **self.results}


def run_probes(settings: ProbeSettings, log: Callable[[str], None] = print) -> ProbeRun:
    world = World(settings.models, settings.personalized)
    seeds = list(range(settings.seeds))
    run = ProbeRun(settings)
    for name in settings.probes:
        if name in NEEDS_PERSONALIZED and not world.has_personalized:
            run.results[name] = {"skipped": f"no personalized model in {settings.models / settings.personalized}"}
            log(f"{name}: skipped (no personalized model)")
            continue
        with torch.no_grad():
            run.results[name] = PROBES[name](world, settings, seeds)
        log(f"{name}: {summary_line(run.results[name])}")
    return run


def summary_line(result: dict) -> str:
    return ", ".join(f"{k} {v['value']} [{v['ci_low']}, {v['ci_high']}]" for k, v in result.items()
                     if isinstance(v, dict) and "value" in v)


# The issue's bars for the probes: key -> (comparison, threshold); P1's is relative to its baseline.
BARS = {"P1b.median_center_distance_px": ("<=", 4.0), "P2.paper_layers_scene_agreement": (">=", 0.8),
        "P2.all_layers_scene_agreement": (">=", 0.95), "P3.color_transfer_rate": (">=", 0.7),
        "P4.min_block_contribution": (">=", 0.2), "P1.scene_rate": (">=", 0.9)}


def flat_values(results: dict) -> dict[str, float]:
    """probes.json's headline numbers: "P1.median_center_distance_px" -> value."""
    flat = {}
    for probe, values in results.items():
        for key, value in values.items():
            if isinstance(value, dict) and "value" in value:
                flat[f"{probe}.{key}"] = value["value"]
    if "P5" in results and isinstance(results["P5"].get("final_iou"), dict):
        flat["P5.final_iou"] = results["P5"]["final_iou"]["value"]
    return flat


def passes(key: str, flat: dict[str, float]) -> bool | None:
    if key == "P1.median_center_distance_px":
        base = flat.get("P1.baseline_median_center_distance_px")
        return None if base is None or key not in flat else flat[key] <= base / 3
    if key not in BARS or key not in flat:
        return None
    op, bar = BARS[key]
    return flat[key] >= bar if op == ">=" else flat[key] <= bar


def markdown_table(values: dict[str, dict]) -> str:
    """One row per probe value, one column per models folder (name -> its probes' results, as in
    probes.json); the bar and whether each passes it."""
    names = list(values)
    flats = {name: flat_values(r) for name, r in values.items()}
    keys = sorted({k for f in flats.values() for k in f}, key=lambda k: (k.split(".")[0], k))
    lines = ["| probe | " + " | ".join(names) + " | bar |", "| --- |" + " --- |" * (len(names) + 1)]
    for key in keys:
        probe, measure = key.split(".", 1)
        cells = []
        for name in names:
            entry = values[name].get(probe, {}).get(measure)
            if key == "P5.final_iou":
                entry = values[name].get("P5", {}).get("final_iou")
            if not isinstance(entry, dict):
                cells.append("-")
                continue
            ok = passes(key, flats[name])
            mark = "" if ok is None else (" (pass)" if ok else " (fail)")
            cells.append(f"{entry['value']} [{entry['ci_low']}, {entry['ci_high']}]{mark}")
        bar = "<= a third of the baseline" if key == "P1.median_center_distance_px" else \
            (f"{BARS[key][0]} {BARS[key][1]}" if key in BARS else "")
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {bar} |")
    return "\n".join(lines) + "\n"

