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
- `sa_map_ca_q`: both;
- `ca_map`: the layout's cross-attention *map* (its queries and its keys, each of the target's tokens given the key of
  the layout's token it matches, the personal token the class word's) on the target's own values, Prompt-to-Prompt's
  and Photoswap's cross-attention map swap;
- `ca_qkv`: the layout's whole cross-attention result (its values too: the layout's words, the scene's among them).

The `none` row's identity says whether the target draws the personal subject at all with that prompt wording.

    python benchmarks/toyworld_swap_windows.py --models layout_retouch/toyworld/models --out windows.json
    python benchmarks/toyworld_swap_windows.py --models DIR --neutral "a photo of sks star" none sa_qkv_all
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

CROSS = {"q": r".*attn2\.to_q", "map": r".*attn2\.to_[qk]", "qkv": r".*attn2\.to_[qkv]"}  # what each swap lends
VARIANTS = {  # name -> (self-attention swap or None, cross-attention swap (a CROSS key) or None, window)
    "none": (None, None, "all"),
    "sa_map_half": ("map", None, "half"),
    "sa_map_all": ("map", None, "all"),
    "sa_qkv_half": ("qkv", None, "half"),
    "sa_qkv_all": ("qkv", None, "all"),
    "ca_q_half": (None, "q", "half"),
    "ca_q_all": (None, "q", "all"),
    "sa_map_ca_q_half": ("map", "q", "half"),
    "sa_map_ca_q_all": ("map", "q", "all"),
    "ca_map_half": (None, "map", "half"),
    "ca_map_all": (None, "map", "all"),
    "sa_map_ca_map_half": ("map", "map", "half"),
    "ca_qkv_half": (None, "qkv", "half"),
}


def token_alignment(tokenizer, layout_prompt: str, target_prompt: str, token: str, class_word: str) -> list[int]:
    """For each position of the target prompt's padded ids, the layout prompt's position of the same word (words
    matched in order, the personal token to the class word), or -1 where none matches."""
    def ids(text):
        return tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    layout, target = ids(layout_prompt), ids(target_prompt)
    personal = set(tokenizer(token, add_special_tokens=False).input_ids)
    class_at = layout.index(tokenizer(class_word, add_special_tokens=False).input_ids[0])
    kept = [i for i, x in enumerate(target) if x not in personal]
    matched = [-1] * len(target)
    blocks = difflib.SequenceMatcher(None, [target[i] for i in kept], layout, autojunk=False).get_matching_blocks()
    for block in blocks:
        for j in range(block.size):
            matched[kept[block.a + j]] = block.b + j
    return [class_at if x in personal else m for x, m in zip(target, matched, strict=True)]


def aligned_keys(alignment: list[int]):
    """`vanilla_outputs_in_personalized`'s `adapt` for the map swap: the layout's queries as they are; its keys
    re-ordered to the target's tokens in the conditional half (the target's own key where no word matches)."""
    index = torch.tensor([max(j, 0) for j in alignment])
    matched = torch.tensor([j >= 0 for j in alignment])

    def adapt(name, lent, own):
        if not name.endswith("to_k"):
            return lent
        half = own.shape[0] // 2
        keys = lent.clone()  # the unconditional half: the same empty prompt on both paths
        keys[half:] = torch.where(matched[None, :, None], lent[half:, index], own[half:])
        return keys
    return adapt


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
        alignment = token_alignment(world.pair.tokenizer, prompts.vanilla, neutral_used, TOKEN, CLASS_WORD)
        for name in names:
            self_swap, cross_swap, window = VARIANTS[name]
            until = args.steps // 2 if window == "half" else args.steps
            plan = ControlPlan(early_swap=self_swap, ref_start=until if self_swap else None)
            controller = AttentionController(plan, latent_size=world.latent_shape[1:])
            swap = contextlib.nullcontext()
            if cross_swap:
                swap = probes.vanilla_outputs_in_personalized(
                    vanilla, personalized, CROSS[cross_swap], None, lambda c=controller, u=until: c.step < u,
                    aligned_keys(alignment) if cross_swap == "map" else None)
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
