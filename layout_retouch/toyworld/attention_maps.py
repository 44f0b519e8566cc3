"""What a toy UNet's self-attention maps look like, and how much swapping them can change (issue 14, P1).

P1 asks the source's self-attention Q, K to move the target's subject. That can only work where the maps
differ from image to image and where the target's output changes when it gets the source's map. This
script runs P1's prompt pairs (B from other noise) with no control, records every self-attention layer's
input over the first half of the steps (the conditional half of CFG), and reports per layer, before the
output projection:

- entropy: mean row entropy of B's map over log(tokens) (1 = attends everywhere alike);
- reach: mean distance from a query to what it attends to, over the latent side (0.52 when it attends
  everywhere alike, 0 when each query attends to itself);
- vs_mean: |P_b V_b - mean(V_b)| / |P_b V_b|, how far B's output is from a plain average of its values
  (0 = the map carries nothing);
- map_swap: |P_a V_b - P_b V_b| / |P_b V_b|, what A's map does to B's output in one call (P1's swap);
- output_swap: |P_a V_a - P_b V_b| / |P_b V_b|, what A's whole output does (P6's swap);
- grouping: the attention mass A's subject queries put on A's subject keys, over the subject's share of
  the tokens (1 = the map does not single the subject out; the subject from the oracles' mask of A's
  final image, pooled to the layer's side).

`--settling` measures instead when the subject's place is decided: per DDIM step, the distance from the
subject's center on that step's prediction of the clean image to its center on the final image (median
over seeds). A swap can move the place only while it is still open.

    python -m layout_retouch.toyworld.attention_maps [--model FOLDER] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from layout_retouch.toyworld.probes import OTHER_NOISE, P1_PAIRS, distance, groups
from layout_retouch.toyworld.scene import SCENES
from layout_retouch.toyworld.world import TOY_MODELS, VANILLA


def record_self_attention_inputs(pipe, prompt: str, seeds: list[int], steps: int, guidance: float, window: int):
    """(layer name -> [per step of the first `window`: the conditional rows' input to attn1, (n, tokens, dim)],
    the final images)."""
    inputs: dict[str, list[torch.Tensor]] = {}
    calls = {"unet": 0}

    def hook_for(name):
        def hook(module, args, kwargs):
            if calls["unet"] < window:
                hidden = args[0] if args else kwargs["hidden_states"]
                inputs.setdefault(name, []).append(hidden[hidden.shape[0] // 2:].detach().float().clone())
        return hook

    def count(module, args, output):
        calls["unet"] += 1

    unet = pipe.unet
    handles = [m.register_forward_pre_hook(hook_for(name), with_kwargs=True)
               for name, m in unet.named_modules() if re.fullmatch(r".*transformer_blocks\.\d+\.attn1", name)]
    handles.append(unet.register_forward_hook(count))
    try:
        generator = [torch.Generator().manual_seed(s) for s in seeds]
        images = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                      num_images_per_prompt=len(seeds)).images
    finally:
        for handle in handles:
            handle.remove()
    return inputs, images


def heads(attn, x: torch.Tensor) -> torch.Tensor:
    n, tokens, dim = x.shape
    return x.view(n, tokens, attn.heads, dim // attn.heads).transpose(1, 2)


@torch.no_grad()
def layer_measures(attn, hidden_a: torch.Tensor, hidden_b: torch.Tensor, subject_a: torch.Tensor) -> dict[str, float]:
    """`subject_a`: (n, 64, 64) bool, A's subject pixels."""
    qa, ka, va = (heads(attn, f(hidden_a)) for f in (attn.to_q, attn.to_k, attn.to_v))
    qb, kb, vb = (heads(attn, f(hidden_b)) for f in (attn.to_q, attn.to_k, attn.to_v))
    pa = (qa @ ka.transpose(-1, -2) * attn.scale).softmax(-1)
    pb = (qb @ kb.transpose(-1, -2) * attn.scale).softmax(-1)
    tokens = pb.shape[-1]
    side = math.isqrt(tokens)
    yx = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).view(-1, 2).float()
    apart = torch.cdist(yx, yx)
    out_b = pb @ vb

    def rel(x):
        return float((x.norm() / out_b.norm()).item())

    entropy = -(pb * pb.clamp_min(1e-12).log()).sum(-1).mean() / math.log(tokens)
    inside = torch.nn.functional.adaptive_avg_pool2d(subject_a[:, None].float(), side).flatten(1) > 0.5
    lifts = []
    for i in range(len(inside)):
        if inside[i].any():
            mass = pa[i][:, inside[i]][:, :, inside[i]].sum(-1).mean()  # heads, subject queries -> subject keys
            lifts.append(float(mass) / float(inside[i].float().mean()))
    return {"entropy": float(entropy), "reach": float((pb * apart).sum(-1).mean() / side),
            "vs_mean": rel(out_b - vb.mean(-2, keepdim=True)), "map_swap": rel(pa @ vb - out_b),
            "output_swap": rel(pa @ va - out_b), "grouping": float(np.mean(lifts)) if lifts else float("nan")}


def load(model: Path):
    """The vanilla pipeline of `model` (quiet) and the toy world's oracles."""
    from diffusers import StableDiffusionPipeline

    from layout_retouch.toyworld.oracles import Oracles

    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, Oracles.load()


def measure(model: Path, seeds: int, steps: int, guidance: float, window: int | None = None
            ) -> dict[str, dict[str, float]]:
    """`window`: how many of the first steps to measure (default half, P1's swap)."""
    window = steps // 2 if window is None else window
    pipe, oracles = load(model)
    attns = dict(pipe.unet.named_modules())
    per_layer: dict[str, list[dict[str, float]]] = {}
    for variant, batch in groups(list(range(seeds)), len(P1_PAIRS)):
        color, obj, scene_a, scene_b = P1_PAIRS[variant]
        a, images = record_self_attention_inputs(pipe, f"a photo of a {color} {obj} {SCENES[scene_a]}", batch,
                                                 steps, guidance, window)
        b, _ = record_self_attention_inputs(pipe, f"a photo of a {color} {obj} {SCENES[scene_b]}",
                                            [s + OTHER_NOISE for s in batch], steps, guidance, window)
        subject = torch.from_numpy(np.stack([reading.mask for reading in oracles.read(images)]))
        for name in a:
            for ha, hb in zip(a[name], b[name], strict=True):
                per_layer.setdefault(name, []).append(layer_measures(attns[name], ha, hb, subject))
    return {name: {k: round(float(np.nanmean([r[k] for r in rows])), 4) for k in rows[0]}
            for name, rows in per_layer.items()}


@torch.no_grad()
def settling(model: Path, seeds: int, steps: int, guidance: float) -> list[float]:
    """Per step: median distance (px) of the subject on the predicted clean image to the final subject."""
    pipe, oracles = load(model)
    step = pipe.scheduler.step
    predicted: list[torch.Tensor] = []

    def step_keeping_prediction(*args, **kwargs):
        out = step(*args, **kwargs)
        predicted.append(out[1] if isinstance(out, tuple) else out.pred_original_sample)
        return out

    pipe.scheduler.step = step_keeping_prediction
    per_step: list[list[float]] = [[] for _ in range(steps)]
    for variant, batch in groups(list(range(seeds)), len(P1_PAIRS)):
        color, obj, scene, _ = P1_PAIRS[variant]
        predicted.clear()
        final_latents = pipe(f"a photo of a {color} {obj} {SCENES[scene]}", num_inference_steps=steps,
                             guidance_scale=guidance, generator=[torch.Generator().manual_seed(s) for s in batch],
                             num_images_per_prompt=len(batch), output_type="latent").images
        latents = torch.cat([*predicted, final_latents])
        images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        readings = oracles.read(pipe.image_processor.postprocess(images, output_type="pil"))
        final = readings[-len(batch):]
        for k in range(steps):
            for i, last in enumerate(final):
                center = readings[k * len(batch) + i].center
                per_step[k].append(distance(center, last.center))
    return [float(np.median(d)) for d in per_step]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=TOY_MODELS / VANILLA, help="a vanilla pipeline folder")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--window", type=int, help="measure the first WINDOW steps (default: half, P1's swap)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settling", action="store_true", help="when the subject's place is decided, per step")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.settling:
        distances = settling(args.model, args.seeds, args.steps, args.guidance)
        print("| step | " + " | ".join(str(k) for k in range(args.steps)) + " |")
        print("| --- |" + " --- |" * args.steps)
        print("| px to the final place | " + " | ".join(f"{d:.1f}" for d in distances) + " |")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"median_center_distance_px": distances}, indent=2))
        return 0
    table = measure(args.model, args.seeds, args.steps, args.guidance, args.window)
    keys = list(next(iter(table.values())))
    print("| layer | " + " | ".join(keys) + " |")
    print("| --- |" + " --- |" * len(keys))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
