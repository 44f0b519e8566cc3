"""Can anything in attention move a toy personalized target's subject onto the layout's? Issue 14, P6b's case.

A vanilla layout (`P_v`) and the personalized target (`P_n`, or `--neutral`) start from the same noise and run
side by side; each variant gives the target some of the layout's attention for a window of steps (the first
half, or every step) and reads the target with the oracles: its subject's distance to the layout's, whether its
scene is the layout's, and its identity. The variants:

- `sa_map`: the method's early swap (the layout's self-attention Q, K on the target's V) in every layer;
- `sa_qkv`: the layout's self-attention Q, K and V (its whole result, through the target's projection);
- `ca_q`: the layout's cross-attention *queries* in every cross-attention layer, on the target's own text
  (the paper passes "intermediate variables from cross and self-attention modules"; Photoswap swaps
  cross-attention maps early): the target's words attend where the layout's features call for them;
- `sa_map_ca_q`: both.

The `none` row's identity says whether the target draws the personal subject at all with that prompt wording.

    python benchmarks/toyworld_swap_windows.py --models layout_retouch/toyworld/models --out windows.json
    python benchmarks/toyworld_swap_windows.py --models DIR --neutral "a photo of sks star" none sa_qkv_all
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

CROSS_QUERIES = r".*attn2\.to_q"
VARIANTS = {  # name -> (self-attention swap or None, cross-attention query swap?, window: "half" or "all")
    "none": (None, False, "all"),
    "sa_map_half": ("map", False, "half"),
    "sa_map_all": ("map", False, "all"),
    "sa_qkv_half": ("qkv", False, "half"),
    "sa_qkv_all": ("qkv", False, "all"),
    "ca_q_half": (None, True, "half"),
    "ca_q_all": (None, True, "all"),
    "sa_map_ca_q_half": ("map", True, "half"),
    "sa_map_ca_q_all": ("map", True, "all"),
}


def main() -> None:
    from layout_retouch.attention_control import LAYOUT, TARGET, AttentionController, ControlPlan
    from layout_retouch.cli.options import add_readout_options, set_threads
    from layout_retouch.sampling import PathInput
    from layout_retouch.toyworld import probes
    from layout_retouch.toyworld.scene import SCENES
    from layout_retouch.toyworld.world import CLASS_WORD, DREAMBOOTH, TOKEN, TOY_MODELS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="*", help=", ".join(VARIANTS))
    parser.add_argument("--models", type=Path, default=TOY_MODELS)
    parser.add_argument("--personalized", default=DREAMBOOTH, help="the personalized model's folder in --models")
    parser.add_argument("--neutral", help="the target's prompt instead of the method's P_n")
    add_readout_options(parser, seeds=16, steps=20)
    args = parser.parse_args()
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    set_threads(args.threads)
    torch.set_grad_enabled(False)

    world = probes.World(args.models, args.personalized)
    if world.pair.personal_unet is None:
        parser.error("needs a personalized UNet of its own (a DreamBooth), as P6b does")
    vanilla, personalized = world.pair.select(False)[0], world.pair.select(True)[0]
    timesteps = world.timesteps(args.steps)
    names = args.variants or list(VARIANTS)
    rows: dict[str, dict[str, list]] = {name: {"distance": [], "scene_is_layout": [], "identity": []}
                                        for name in names}
    neutral_used = None
    start = time.perf_counter()
    for variant, batch in probes.groups(list(range(args.seeds)), len(probes.CONTEXT_SCENES)):
        prompts = world.pipe.derive_prompts(
            f"a photo of a {TOKEN} {CLASS_WORD} {SCENES[probes.CONTEXT_SCENES[variant]]}")
        neutral_used = args.neutral or prompts.neutral
        z = probes.noises(world, batch)
        layout = PathInput(LAYOUT, z, False, world.conditioning(prompts.vanilla, False))
        target = PathInput(TARGET, z, True, world.conditioning(neutral_used, True))
        for name in names:
            self_swap, cross_swap, window = VARIANTS[name]
            until = args.steps // 2 if window == "half" else args.steps
            plan = ControlPlan(early_swap=self_swap, ref_start=until if self_swap else None)
            controller = AttentionController(plan, latent_size=world.latent_shape[1:])
            swap = contextlib.nullcontext()
            if cross_swap:
                swap = probes.vanilla_outputs_in_personalized(vanilla, personalized, CROSS_QUERIES, None,
                                                              lambda c=controller, u=until: c.step < u)
            with swap:
                src, tgt = world.lockstep(layout, target, plan, timesteps, args.guidance, controller)
            readings = world.read(torch.cat([src, tgt]))
            n = len(batch)
            for lay, got in zip(readings[:n], readings[n:], strict=True):
                rows[name]["distance"].append(probes.distance(got.center, lay.center))
                rows[name]["scene_is_layout"].append(got.scene == lay.scene)
                rows[name]["identity"].append(got.identity)
        print(f"prompt {variant + 1} of {len(probes.CONTEXT_SCENES)}: {time.perf_counter() - start:.0f} s", flush=True)

    summary = {name: {"median_center_distance_px": probes.interval(r["distance"]),
                      "scene_is_layout_rate": probes.interval(r["scene_is_layout"], np.mean),
                      "identity": probes.interval(r["identity"], np.mean)} for name, r in rows.items()}
    for name, s in summary.items():
        d = s["median_center_distance_px"]
        print(f"{name:18s} {d['value']:6.2f} px [{d['ci_low']:.1f}, {d['ci_high']:.1f}]   scene = layout's "
              f"{s['scene_is_layout_rate']['value']:.2f}   identity {s['identity']['value']:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"models": str(args.models), "personalized": args.personalized,
                                        "target_prompt": neutral_used, "seeds": args.seeds, "steps": args.steps,
                                        "guidance": args.guidance, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
