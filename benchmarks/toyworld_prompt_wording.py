"""Does a toy personalization answer to the prompt's wording? The article in `a photo of a sks star`, issue 14.

The toy DreamBooths are trained on `a photo of sks star` with prior preservation on `a photo of a star`; the
method's neutral prompt P_n is `a photo of a sks star`, and so are the benchmark's prompts. The toy text encoder
is small, and `a sks star` may read as the class prompt. This samples a personalized model (plain sampling,
DDIM, the personalized report's settings) on each wording, with and without a context, and reads identity,
the spread of the subject's center and the scenes with the oracles.

    python benchmarks/toyworld_prompt_wording.py --personalized layout_retouch/toyworld/models/sks_star_dreambooth
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

PROMPTS = ("a photo of sks star", "a photo of a sks star", "a photo of sks star in the snow",
           "a photo of a sks star in the snow", "a photo of sks star at night", "a photo of a sks star at night")


def main() -> None:
    from layout_retouch.cli.options import add_readout_options, set_threads
    from layout_retouch.personalize.loading import load_personalized_pipeline
    from layout_retouch.toyworld.measures import layout_diversity
    from layout_retouch.toyworld.oracles import Oracles
    from layout_retouch.toyworld.personalized_report import sample
    from layout_retouch.toyworld.world import TOY_MODELS, VANILLA

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vanilla", type=Path, default=TOY_MODELS / VANILLA)
    parser.add_argument("--personalized", type=Path, required=True, help="a personalized model's folder")
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    add_readout_options(parser, seeds=16, steps=30)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    set_threads(args.threads)
    pipe = load_personalized_pipeline(str(args.vanilla), args.personalized)
    pipe.set_progress_bar_config(disable=True)
    oracles = Oracles.load()
    found = {}
    for prompt in args.prompts:
        readings = oracles.read(sample(pipe, prompt, range(args.seeds), args.steps, args.guidance))
        found[prompt] = {"identity": float(np.mean([r.identity for r in readings])),
                         "center_std_px": layout_diversity([r.center for r in readings])["std"],
                         "scenes": dict(Counter(r.scene for r in readings).most_common())}
        print(f"{prompt:36s} identity {found[prompt]['identity']:.2f}   center std "
              f"{found[prompt]['center_std_px']:4.1f} px   scenes {found[prompt]['scenes']}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"personalized": str(args.personalized), "seeds": args.seeds,
                                        "steps": args.steps, "guidance": args.guidance, "prompts": found},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
