"""Where a toy-bench unit (personalization or sweep point, row, prompt) lives on disk, and how it is read back.

Shared by the bench that writes units and the report that draws from them, so neither imports the other.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from PIL import Image

from layout_retouch.outputs import atomic_write_bytes, save_png, slug
from layout_retouch.toyworld.bench_prompts import BenchPrompt


def prompt_key(prompt: BenchPrompt) -> str:
    """File-name stem of a prompt: readable, and unique through a short hash of the template."""
    digest = hashlib.sha1(prompt.template.encode()).hexdigest()[:6]
    return f"{slug(prompt.template.replace('{}', 'subject'), 50)}-{digest}"


def unit_path(root: Path, group: str, row: str, prompt: BenchPrompt) -> Path:
    """Records of one (personalization or sweep point, row, prompt); the PNG strip sits beside it."""
    return root / group / row / f"{prompt_key(prompt)}.json"


def load_unit(path: Path, seeds: tuple[int, ...], config: dict) -> dict | None:
    """A finished unit made with these seeds and this config, or None (then it is made again)."""
    if not path.is_file():
        return None
    unit = json.loads(path.read_text())
    if unit.get("seeds") != list(seeds) or unit.get("config") != json.loads(json.dumps(config, default=str)):
        return None
    return unit


def strip_image(images: list[Image.Image]) -> Image.Image:
    """The images of one unit side by side, in seed order (what the grids are cut from)."""
    w, h = images[0].size
    strip = Image.new("RGB", (w * len(images), h))
    for i, im in enumerate(images):
        strip.paste(im.convert("RGB"), (i * w, 0))
    return strip


def strip_cells(path: Path, count: int) -> list[Image.Image]:
    strip = Image.open(path).convert("RGB")
    w = strip.width // count
    return [strip.crop((i * w, 0, (i + 1) * w, strip.height)) for i in range(count)]


def write_unit(path: Path, images: list[Image.Image], prompt: BenchPrompt, text: str, seeds, config: dict,
               seconds: float, oracles, extra: dict | None = None) -> dict:
    """Score the images and write PNG strip, then JSON (the JSON's presence marks the unit done)."""
    from layout_retouch.toyworld.bench_stats import image_record  # the oracles' torch, only when scoring

    readings = oracles.read(images)
    unit = {
        "template": prompt.template, "prompt": text, "kind": prompt.kind, "fixes_position": prompt.fixes_position,
        "seeds": list(seeds), "config": json.loads(json.dumps(config, default=str)),
        "seconds": round(seconds, 2), **(extra or {}),
        "records": [image_record(s, r, prompt.scoring_text) for s, r in zip(seeds, readings, strict=True)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(strip_image(images), path.with_suffix(".png"))
    atomic_write_bytes(path, json.dumps(unit, indent=1).encode())
    return unit


# --------------------------------------------------------------------- the T_l / S_ref / S_mask sweep

# Paper Fig. 8 sweeps T_l over 0..20 of 50 steps; S_ref and S_mask get the same treatment here.
# Values are for 50 steps and scale with the step count. S_mask follows S_ref unless swept itself.
SWEEP_VALUES = {
    "vanilla_steps": (0, 5, 10, 15, 20),
    "ref_start_step": (0, 4, 10, 20),
    "mask_start_step": (4, 10, 20, 30),
}
SWEEP_SYMBOLS = {"vanilla_steps": "T_l", "ref_start_step": "S_ref", "mask_start_step": "S_mask"}
