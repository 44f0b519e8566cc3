"""`layout-retouch toy-probes`: does a toy world's self-attention carry structure and appearance?

Runs the probes of `layout_retouch.toyworld.probes` (P1 structure transfer, P1b the method's early swap,
P2 the blend bound, P3 appearance transfer, P4 block contributions, P5 mask quality, P6 routing, P6b the
personalized target's routing) on one or more toy worlds' models folders, and writes DIR/probes.json (the
headline numbers flat, as "P1.median_center_distance_px", then every probe's detail) and DIR/probes.md (a
table, one column per models folder, with the issue's bars).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from layout_retouch.cli.options import HelpFormatter, add_threads_option, check_output_folder, set_threads
from layout_retouch.errors import LayoutRetouchError
from layout_retouch.toyworld.world import DREAMBOOTH

PROBE_NAMES = ("P1", "P1b", "P2", "P3", "P4", "P5", "P6", "P6b")
QUICK = dict(seeds=4, steps=6)  # CI-sized: every code path, numbers too noisy to judge a world by


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("toy-probes", help="probe whether a toy world's self-attention carries structure",
                       formatter_class=HelpFormatter, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/toy_probes", help="output folder")
    p.add_argument("--models", type=Path, action="append",
                   help="a toy world's models folder (vanilla/, optional sks_star_dreambooth/ and oracles/); "
                        "repeat to compare worlds side by side (default: the shipped toy world)")
    p.add_argument("--personalized", default=DREAMBOOTH, metavar="NAME",
                   help="the personalized model's folder in each --models folder (P1b, P2, P5, P6b): "
                        "a DreamBooth, or a LoRA folder; 'vanilla' is the control with no personalization")
    p.add_argument("--seeds", type=int, default=16, help="seeds per probe (bootstrap intervals over them)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--probes", default=",".join(PROBE_NAMES),
                   help="comma-separated subset of " + ", ".join(PROBE_NAMES))
    p.add_argument("--quick", action="store_true", help=f"CI-sized run: {QUICK['seeds']} seeds, {QUICK['steps']} "
                   "steps (checks the code, judges nothing)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing probes.json in --out")
    add_threads_option(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from layout_retouch.toyworld.world import TOY_MODELS, VANILLA

    probes = tuple(p.strip() for p in args.probes.split(",") if p.strip())
    unknown = [p for p in probes if p not in PROBE_NAMES]
    if unknown or not probes:
        raise LayoutRetouchError(f"--probes: unknown probe(s) {', '.join(unknown) or '(none given)'}; "
                                 f"choose from {', '.join(PROBE_NAMES)}")
    seeds, steps = (QUICK["seeds"], QUICK["steps"]) if args.quick else (args.seeds, args.steps)
    if seeds < 1 or steps < 2:
        raise LayoutRetouchError(f"--seeds must be 1 or more and --steps 2 or more, got {seeds} and {steps}")
    folders = args.models or [TOY_MODELS]
    for folder in folders:
        if not (folder / VANILLA / "model_index.json").exists():
            raise LayoutRetouchError(f"--models {folder}: no {VANILLA}/model_index.json there (a toy world's "
                                     "models folder holds vanilla/ and optionally sks_star_dreambooth/)")
    out = check_output_folder(args.out)
    if (out / "probes.json").exists() and not args.overwrite:
        raise LayoutRetouchError(f"{out} already holds probes.json; pass --overwrite or another --out")
    set_threads(args.threads)
    from layout_retouch.outputs import atomic_write_bytes
    from layout_retouch.toyworld.probes import ProbeSettings, flat_values, markdown_table, run_probes

    log = (lambda text: None) if args.quiet else (lambda text: print(text, flush=True))
    runs, started = {}, time.perf_counter()
    for folder in folders:
        name = _unique_name(folder, runs)
        log(f"probing {folder} ({seeds} seeds, {steps} steps)")
        settings = ProbeSettings(models=folder, seeds=seeds, steps=steps, guidance=args.guidance, probes=probes,
                                 personalized=args.personalized)
        runs[name] = run_probes(settings, log)
    first = next(iter(runs.values()))
    report = {**flat_values(first.results), **first.to_dict(), "seconds": round(time.perf_counter() - started, 1),
              "compared": {name: {**flat_values(r.results), **r.to_dict()} for name, r in list(runs.items())[1:]}}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "probes.json", json.dumps(report, indent=1).encode())
    table = markdown_table({name: r.results for name, r in runs.items()})
    atomic_write_bytes(out / "probes.md", table.encode())
    log(table)
    log(f"wrote {out / 'probes.json'} and {out / 'probes.md'}")
    return 0


def _unique_name(folder: Path, taken: dict) -> str:
    """A column name for a models folder: its last two path parts, unique among those already taken."""
    name = "/".join(folder.resolve().parts[-2:])
    return name if name not in taken else f"{name} ({len(taken) + 1})"
