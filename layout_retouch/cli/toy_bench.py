"""`layout-retouch toy-bench`: the paper's ablation and trade-off sweep, measured in the toy world.

Runs rows I-V (and with `--baselines` FreeU, MagicFusion and DreamMatcher) on the shipped toy
personalizations over a fixed prompt set (or `--prompts FILE`) and seeds, scores every image with the
oracles and writes results.json, table.md, scatter plots and image grids (`--sweep`: the T_l / S_ref /
S_mask sweep instead). Re-running with the same `--out` and settings resumes: finished (personalization,
row, prompt) units are not made again.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from layout_retouch.cli.options import add_threads_option, set_threads
from layout_retouch.errors import LayoutRetouchError


def register(sub: argparse._SubParsersAction) -> None:
    from layout_retouch.toyworld.bench import (
        DEFAULT_SEEDS,
        DEFAULT_STEPS,
        METHODS,
        PERSONALIZATION_FOLDERS,
        QUICK_STEPS,
    )

    p = sub.add_parser("toy-bench", help="ablation I-V and trade-off sweep on the embedded toy world",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="out/toy_bench", help="output folder (re-use it to resume)")
    p.add_argument("--quick", action="store_true",
                   help=f"CI-sized run: 2 prompts, 2 seeds, {QUICK_STEPS} steps, DreamBooth only")
    p.add_argument("--sweep", action="store_true", help="run the T_l / S_ref / S_mask sweep (full method V)")
    p.add_argument("--prompts", help="file of prompt templates, one a line, subject phrase as {}")
    p.add_argument("--seeds", type=int, help=f"seeds per prompt (default {DEFAULT_SEEDS}; --quick: 2)")
    p.add_argument("--steps", type=int, help=f"DDIM steps (default {DEFAULT_STEPS}, as the paper; --quick: "
                   f"{QUICK_STEPS}). S_ref keeps its share of the trajectory at other counts")
    p.add_argument("--personalizations", nargs="+", choices=tuple(PERSONALIZATION_FOLDERS),
                   help="which toy personalizations (default: all; --quick: dreambooth)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="ablation rows to run")
    p.add_argument("--baselines", action="store_true",
                   help="also run the paper's baselines (FreeU, MagicFusion, DreamMatcher) as rows of their own")
    p.add_argument("--models", type=Path, help="folder holding vanilla/, references/ and sks_star_* "
                   "(default: the shipped toy models)")
    p.add_argument("--config", help="JSON file of LayoutRetouchConfig values on top of the toy world's settings, "
                   'e.g. {"vanilla_steps": 15} (the T_l a sweep picked); every row and sweep point takes them')
    add_threads_option(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def settings_from_args(args):
    from layout_retouch.config import BASELINES
    from layout_retouch.toyworld.bench import (
        DEFAULT_SEEDS,
        DEFAULT_STEPS,
        METHODS,
        PERSONALIZATION_FOLDERS,
        QUICK_SEEDS,
        QUICK_STEPS,
        TOY_MODELS,
        BenchSettings,
        seeds_of,
    )
    from layout_retouch.toyworld.bench_prompts import default_prompts, load_prompt_file

    if args.steps is not None and args.steps < 1:
        raise LayoutRetouchError("--steps must be at least 1")
    prompts = load_prompt_file(args.prompts) if args.prompts else default_prompts(quick=args.quick)
    seeds = seeds_of(args.seeds if args.seeds is not None else QUICK_SEEDS if args.quick else DEFAULT_SEEDS)
    steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    names = tuple(args.personalizations or (("dreambooth",) if args.quick else PERSONALIZATION_FOLDERS))
    return BenchSettings(out=Path(args.out), prompts=prompts, seeds=seeds, steps=steps, personalizations=names,
                         methods=tuple(m for m in METHODS if m in args.methods)
                         + (BASELINES if getattr(args, "baselines", False) else ()),
                         models_dir=args.models or TOY_MODELS,
                         overrides=bench_overrides(getattr(args, "config", None)))


def bench_overrides(path: str | None) -> dict:
    """The --config file's values, checked now (unknown keys, types, ranges) rather than at the first unit."""
    from layout_retouch.cli.options import read_config_file
    from layout_retouch.config import LayoutRetouchConfig

    if path is None:
        return {}
    values = read_config_file(path)
    if "method" in values:
        raise LayoutRetouchError(f"config file {path}: 'method' is chosen per row by the bench (--methods); "
                                 "leave it out")
    LayoutRetouchConfig.from_dict(values)
    return values


def run(args) -> int:
    from layout_retouch.toyworld.bench import run_bench, run_sweep

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    set_threads(args.threads)
    settings = settings_from_args(args)
    log = (lambda _: None) if args.quiet else (lambda line: print(line, flush=True))
    start = time.perf_counter()
    if args.sweep:
        run_sweep(settings, log)
        written = ["sweep.json", "sweep.md", "sweep.png"]
    else:
        results = run_bench(settings, log)
        written = ["results.json", "table.md", "scatter_*.png", "grids/"]
        if not args.quiet:
            print((settings.out / "table.md").read_text())
        for name, why in results["personalizations"]["missing"].items():
            print(f"missing personalization {name}: {why}")
    print(f"wrote {', '.join(str(settings.out / w) for w in written)} in {time.perf_counter() - start:.0f} s")
    return 0
