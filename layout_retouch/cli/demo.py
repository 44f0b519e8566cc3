"""`layout-retouch demo`: the whole method on the embedded toy world, offline, in about a minute.

It loads the toy world's models exactly as a user loads Stable Diffusion (pipeline folders, the
segmenter interface), runs plain DreamBooth (I), the layout (II) and the full method (V) with the
same seeds, and writes a labelled grid and the oracles' measures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from layout_retouch.cli.options import (
    HelpFormatter,
    add_threads_option,
    check_output_folder,
    quiet_libraries,
    set_threads,
)
from layout_retouch.config import LayoutRetouchConfig
from layout_retouch.errors import LayoutRetouchError
from layout_retouch.outputs import atomic_write_bytes, save_png
from layout_retouch.toyworld.world import (  # noqa: F401
    CLASS_WORD,
    SETTINGS,
    TOKEN,
    TOY_METHOD,
    TOY_MODELS,
    find_toy_models,
)

PROMPTS = (  # context the DreamBooth model tends to lose (toyworld/README.md): scenes, accessories, occluders
    "a photo of a sks star at night",
    "a photo of a sks star in the snow",
    "a photo of a sks star wearing a red hat on the beach",
    "a photo of a sks star behind a fence on the grass",
)
COLUMNS = ("reference", "plain DreamBooth (I)", "layout (II)", "Layout-and-Retouch (V)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the full method on the embedded toy world (no download, CPU)",
                       formatter_class=HelpFormatter)
    p.add_argument("--out", default="out/demo", help="output folder")
    p.add_argument("--personalized", default="sks_star_dreambooth",
                   help="toy personalized model under toyworld/models (or any path)")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt (the grid shows the first)")
    p.add_argument("--steps", type=int, default=LayoutRetouchConfig().num_inference_steps)
    p.add_argument("--settings", choices=tuple(SETTINGS), default="world",
                   help="world: the settings this toy world's measurements pick (T_l 20 of 50, the target started "
                   "from the layout; toyworld/world.py); paper: the paper's defaults, with which Stage 2 cannot "
                   "steer the toy DreamBooth (docs/RESULTS.md)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo in --out")
    add_threads_option(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run, checks_first=True)


def run(args) -> int:
    out = Path(args.out)
    if (out / "summary.json").exists() and not args.overwrite:
        raise LayoutRetouchError(f"{out} already holds a demo; pass --overwrite or another --out")
    if args.seeds < 1 or args.steps < 1:
        raise LayoutRetouchError(f"--seeds and --steps must be 1 or more, got {args.seeds} and {args.steps}")
    check_output_folder(out)
    base, tuned, reference = find_toy_models(args.personalized)
    set_threads(args.threads)
    quiet_libraries(args.quiet)
    import torch
    from tqdm.auto import tqdm

    from layout_retouch.pipeline import LayoutRetouchPipeline

    start = time.perf_counter()
    pipe = LayoutRetouchPipeline.from_pretrained(str(base), personalized=str(tuned), token=TOKEN,
                                                 class_word=CLASS_WORD, progress=False)
    config = LayoutRetouchConfig(num_inference_steps=args.steps, inversion_cache_dir=str(out / "cache"),
                                 **TOY_METHOD, **SETTINGS[args.settings])
    results: dict[str, list] = {"I": [], "II": [], "V": []}
    rows = []
    for prompt in tqdm(PROMPTS, desc="demo", disable=args.quiet):
        generator = [torch.Generator().manual_seed(s) for s in range(args.seeds)]
        plain = pipe(prompt, config=config.replace(method="I"), num_images_per_prompt=args.seeds,
                     generator=generator)
        generator = [torch.Generator().manual_seed(s) for s in range(args.seeds)]
        full = pipe(prompt, reference_image=reference, config=config.replace(method="V"),
                    num_images_per_prompt=args.seeds, generator=generator)
        results["I"] += [(prompt, im) for im in plain.images]
        results["II"] += [(prompt, im) for im in full.layout_images]
        results["V"] += [(prompt, im) for im in full.images]
        rows.append((prompt, [full.reference_image, plain.images[0], full.layout_images[0], full.images[0]]))
    seconds = time.perf_counter() - start

    out.mkdir(parents=True, exist_ok=True)
    save_png(grid(rows), out / "grid.png", {"prompts": PROMPTS, "config": config.to_dict()})
    for method, items in results.items():
        for i, (prompt, image) in enumerate(items):
            (out / method).mkdir(exist_ok=True)
            save_png(image, out / method / f"{i:03d}.png", {"prompt": prompt, "method": method})
    summary = {
        "models": pipe.models.sources, "reference": str(reference), "settings": args.settings,
        "config": config.to_dict(),
        "prompts": PROMPTS, "seeds_per_prompt": args.seeds, "seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "measures": measure(results),
    }
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2, default=str).encode())
    print(f"wrote {out / 'grid.png'} and {out / 'summary.json'} in {seconds:.0f} s "
          f"({torch.get_num_threads()} torch threads; {args.settings} settings: T_l {config.num_vanilla_steps} of "
          f"{config.num_inference_steps}, target from the {'layout' if config.target_start == 'layout' else 'noise'})")
    for method, m in summary["measures"].items():
        context = m["prompt_fidelity"].get("context", {}).get("rate", float("nan"))
        print(f"  {method:>3}: identity {m['identity']:.2f}  context followed {context:.0%}  "
              f"center spread per prompt {m['center_spread_per_prompt']:.1f} px")
    return 0


def measure(results: dict[str, list]) -> dict:
    """The oracles' reading of each method's images; layout spread is across seeds, within a prompt."""
    from layout_retouch.toyworld.measures import layout_diversity, score_images
    from layout_retouch.toyworld.oracles import Oracles

    oracles = Oracles.load()
    measures = {}
    for method, items in results.items():
        scores = score_images([im for _, im in items], [p for p, _ in items], oracles)
        spreads = []
        for prompt in dict.fromkeys(p for p, _ in items):
            readings = oracles.read([im for p, im in items if p == prompt])
            spreads.append(layout_diversity([r.center for r in readings])["std"])
        scores["center_spread_per_prompt"] = sum(spreads) / len(spreads)
        measures[method] = scores
    return measures


def label_font(size: int = 12):
    """Pillow's built-in font at a size whose spaces show: at its default 10 px a space is 2 px wide and the
    words of a label run together. Old Pillow (no sized default) keeps its bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def grid(rows: list[tuple[str, list[Image.Image]]], cell: int = 128, label: int = 18) -> Image.Image:
    """Reference, plain, layout and retouched side by side, one prompt per row, with labels."""
    width = cell * len(COLUMNS)
    canvas = Image.new("RGB", (width, label + len(rows) * (cell + label)), "white")
    draw = ImageDraw.Draw(canvas)
    font = label_font()
    for j, title in enumerate(COLUMNS):
        draw.text((j * cell + 4, 3), title, fill="black", font=font)
    for i, (prompt, images) in enumerate(rows):
        top = label + i * (cell + label)
        draw.text((4, top + 3), prompt, fill="black", font=font)
        for j, image in enumerate(images):
            canvas.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (j * cell, top + label))
    return canvas
