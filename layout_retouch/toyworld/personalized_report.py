"""How the toy personalized models compare with vanilla, read by the oracles.

  python -m layout_retouch.toyworld.personalized_report --out out/personalized_report

Three questions, the paper's observation about personalized models (issue 4's bars):
- identity: with the neutral prompt `a photo of sks star`, is the subject the personal star?
- layout diversity: how far do subject centers spread over seeds (neutral prompt, no position)?
- context: with `... at night / in the snow / wearing a red hat / behind a fence`, does the image
  show the asked context? Vanilla is asked the same with a generic `star`.
Sampling is plain diffusers (DDIM, classifier-free guidance), as in quality.py. Writes
`report.json` and one sample sheet per model.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from layout_retouch.personalize.base import load_base_pipeline
from layout_retouch.personalize.loading import load_personalized_pipeline
from layout_retouch.toyworld.measures import identity, layout_diversity, prompt_fidelity
from layout_retouch.toyworld.oracles import Oracles
from layout_retouch.toyworld.quality import grid

MODELS = Path(__file__).parent / "models"
# How each model names the subject in a prompt (vanilla: a generic star of the class).
SUBJECT = {"vanilla": "star", "dreambooth": "sks star", "lora": "sks star", "textual_inversion": "<sks> star"}
FOLDERS = {"dreambooth": "sks_star_dreambooth", "lora": "sks_star_lora", "textual_inversion": "sks_star_ti"}
NEUTRAL = "a photo of {subject}"  # issue 4's neutral prompt: `a photo of sks star`
CONTEXTS = ("at night", "in the snow", "wearing a red hat", "behind a fence")
CONTEXT_PROMPT = "a photo of a {subject} {context}"
NEUTRAL_SEEDS = 32  # issue 4: subject-center spread over 32 seeds
CONTEXT_SEEDS = 8  # per context prompt (4 contexts: 32 images per model)
IDENTITY_BAR = 0.8  # issue 4: DreamBooth identity on the neutral prompt


def sample(pipe: StableDiffusionPipeline, prompt: str, seeds: range, steps: int, guidance: float):
    # One generator per image: an image depends on its seed only, not on the batch around it.
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe([prompt] * len(seeds), num_inference_steps=steps, guidance_scale=guidance,
                generator=generators).images


def measure(pipe, subject: str, oracles: Oracles, steps: int, guidance: float, neutral_template: str = NEUTRAL,
            context_template: str = CONTEXT_PROMPT) -> tuple[dict, list]:
    neutral = neutral_template.format(subject=subject)
    images = sample(pipe, neutral, range(NEUTRAL_SEEDS), steps, guidance)
    readings = oracles.read(images)
    report = {
        "neutral_prompt": neutral,
        "identity_neutral": identity(readings),
        "layout_diversity_neutral": layout_diversity([r.center for r in readings]),
        "class_star_neutral": sum(r.obj == "star" for r in readings) / len(readings),
    }
    prompts, context_images = [], []
    for context in CONTEXTS:
        prompt = context_template.format(subject=subject, context=context)
        context_images += sample(pipe, prompt, range(CONTEXT_SEEDS), steps, guidance)
        prompts += [prompt] * CONTEXT_SEEDS
    context_readings = oracles.read(context_images)
    report["context_prompt"] = context_template
    report["context_fidelity"] = prompt_fidelity(context_readings, prompts)
    report["identity_context"] = identity(context_readings)
    return report, images[:16] + context_images[::4]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vanilla", default=str(MODELS / "vanilla"))
    parser.add_argument("--models", type=Path, default=MODELS, help="folder holding the personalized models")
    parser.add_argument("--only", nargs="*", default=list(SUBJECT), choices=list(SUBJECT))
    parser.add_argument("--out", type=Path, default=Path("out/personalized_report"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    # A toy personalization can answer to one wording only (`a photo of sks star` but not `a photo of a sks star`):
    # read it in the wording it was trained on.
    parser.add_argument("--neutral", default=NEUTRAL, help=f"neutral prompt template (default {NEUTRAL!r})")
    parser.add_argument("--context", default=CONTEXT_PROMPT,
                        help=f"context prompt template (default {CONTEXT_PROMPT!r})")
    args = parser.parse_args(argv)
    for option, template, fields in (("--neutral", args.neutral, ("{subject}",)),
                                     ("--context", args.context, ("{subject}", "{context}"))):
        missing = [f for f in fields if f not in template]
        if missing:
            example = parser.get_default(option[2:])
            parser.error(f"{option} {template!r} lacks {' and '.join(missing)}, e.g. {example!r}")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    oracles = Oracles.load()
    report = {"ddim_steps": args.steps, "guidance": args.guidance, "models": {}}
    for name in args.only:
        began = time.time()
        if name == "vanilla":
            pipe = load_base_pipeline(args.vanilla, "cpu")
        else:
            pipe = load_personalized_pipeline(args.vanilla, args.models / FOLDERS[name])
        result, shown = measure(pipe, SUBJECT[name], oracles, args.steps, args.guidance, args.neutral, args.context)
        result["seconds"] = round(time.time() - began, 1)
        report["models"][name] = result
        grid(shown).save(args.out / f"samples_{name}.png")
        fid = result["context_fidelity"]
        print(f"{name:18s} identity {result['identity_neutral']:.3f}  center std "
              f"{result['layout_diversity_neutral']['std']:.2f}px  entropy "
              f"{result['layout_diversity_neutral']['grid_entropy_bits']:.2f} bits  context "
              + "  ".join(f"{k} {v['rate']:.2f}" for k, v in fid.items() if k != "class"), flush=True)
    if "dreambooth" in report["models"]:
        db = report["models"]["dreambooth"]
        report["identity_bar"] = {"bar": IDENTITY_BAR, "passed": db["identity_neutral"] >= IDENTITY_BAR}
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
