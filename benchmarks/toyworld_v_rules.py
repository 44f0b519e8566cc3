"""Where does the full method (V) lose the layout? Issue 14 item 5, one rule at a time, in a toy world.

Runs the method through `LayoutRetouchPipeline` on a toy world's DreamBooth (or LoRA) with one config change per
variant and reads every target and its layout with the oracles: the target's scene against the prompt's
and against the layout's, identity, the subject's distance to the layout's subject, and the blend mask's
mean coverage. Two variants replace the adaptive mask by a constant (M = 0: the target takes the layout's
outputs in every blend layer; M = 1: no blend), which no config value does.

    python benchmarks/toyworld_v_rules.py --models layout_retouch/toyworld/models --seeds 8 --steps 50
    python benchmarks/toyworld_v_rules.py V "V:early_swap=qkv,ref_start_step=20"   # a variant of your own
    python benchmarks/toyworld_v_rules.py --settings world   # every variant on the world's settings (as make demo)
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

VARIANTS = {  # name -> (config changes, constant mask or None)
    "I": ({"method": "I"}, None),
    "II": ({"method": "II"}, None),
    "IV": ({"method": "IV"}, None),
    "V": ({"method": "V"}, None),
    "V_mask0": ({"method": "V"}, 0.0),
    "V_mask1": ({"method": "V"}, 1.0),
    "V_noref": ({"method": "V", "ref_min_resolution": 2.0, "mask_min_resolution": 0.5}, None),  # no K,V swap
    "V_blendall": ({"method": "V", "mask_min_resolution": 0.0}, None),  # every decoder layer blends
    "V_qkv": ({"method": "V", "early_swap": "qkv"}, None),
    "V_Pp": ({"method": "V", "target_prompt": "personalized"}, None),
    "V_sref0": ({"method": "V", "ref_start_step": 0}, None),
    "V_tau05": ({"method": "V", "tau": 0.5}, None),
}


def parse_variant(spec: str) -> tuple[dict, None]:
    """'V:early_swap=qkv,ref_start_step=20' -> config changes."""
    method, _, rest = spec.partition(":")
    changes: dict = {"method": method}
    for item in filter(None, rest.split(",")):
        key, value = item.split("=")
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value
    return changes, None


@contextlib.contextmanager
def mask_probe(constant: float | None, coverage: list[float]):
    """Record each step's blend mask coverage; with `constant`, blend with that mask instead."""
    import layout_retouch.stage2_retouch as stage2

    original = stage2.MaskBuilder.__call__

    def call(self, controller):
        mask = original(self, controller)
        if constant is not None:
            mask = torch.full_like(mask, constant)
        coverage.append(float(mask.mean()))
        return mask

    stage2.MaskBuilder.__call__ = call
    try:
        yield
    finally:
        stage2.MaskBuilder.__call__ = original


def main() -> None:
    from layout_retouch.config import LayoutRetouchConfig
    from layout_retouch.pipeline import LayoutRetouchPipeline
    from layout_retouch.toyworld import world
    from layout_retouch.toyworld.bench import PERSONALIZATION_FOLDERS, scaled_step_settings
    from layout_retouch.toyworld.oracles import Oracles
    from layout_retouch.toyworld.probes import CONTEXT_SCENES
    from layout_retouch.toyworld.scene import SCENES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="*", help=f"names ({', '.join(VARIANTS)}) or METHOD:key=value,...")
    parser.add_argument("--models", type=Path, default=world.TOY_MODELS)
    parser.add_argument("--seeds", type=int, default=8, help="images per prompt (4 scene prompts)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--personalization", choices=("dreambooth", "lora"), default="dreambooth",
                        help="which of the toy world's personalized models (both say `sks star`)")
    parser.add_argument("--settings", choices=tuple(world.SETTINGS), default="paper",
                        help="the paper's defaults, or the world's (toyworld/world.py TOY_SETTINGS, as make demo)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    folder = PERSONALIZATION_FOLDERS[args.personalization]
    vanilla, personalized, reference = world.find_toy_models(folder, models=args.models)
    pipe = LayoutRetouchPipeline.from_pretrained(str(vanilla), personalized=str(personalized),
                                                 personalization=args.personalization, token=world.TOKEN,
                                                 class_word=world.CLASS_WORD, progress=False)
    oracles = Oracles.load()
    prompts = {scene: f"a photo of a {world.TOKEN} {world.CLASS_WORD} {SCENES[scene]}" for scene in CONTEXT_SCENES}
    base = dict(num_inference_steps=args.steps, **scaled_step_settings(args.steps), **world.TOY_METHOD,
                **world.SETTINGS[args.settings])
    for name in args.variants or VARIANTS:
        changes, constant = VARIANTS[name] if name in VARIANTS else parse_variant(name)
        config = LayoutRetouchConfig(**{**base, **changes})
        coverage: list[float] = []
        rows = []
        start = time.perf_counter()
        with mask_probe(constant, coverage):
            for scene, prompt in prompts.items():
                out = pipe(prompt, reference, config=config, num_images_per_prompt=args.seeds,
                           generator=torch.Generator().manual_seed(42))
                targets = oracles.read(out.images)
                layouts = oracles.read(out.layout_images) if out.layout_images else targets
                for t, lay in zip(targets, layouts, strict=True):
                    rows.append(dict(scene_prompt=t.scene == scene, scene_layout=t.scene == lay.scene,
                                     layout_scene_prompt=lay.scene == scene, identity=t.identity,
                                     layout_identity=lay.identity,
                                     distance=float(np.hypot(t.center[0] - lay.center[0],
                                                             t.center[1] - lay.center[1]))))
        summary = {key: round(float(np.mean([r[key] for r in rows])), 3) for key in rows[0] if key != "distance"}
        summary["median_distance_px"] = round(float(np.median([r["distance"] for r in rows])), 2)
        summary["mask_coverage"] = round(float(np.mean(coverage)), 3) if coverage else None
        summary["seconds"] = round(time.perf_counter() - start, 1)
        print(name, json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
