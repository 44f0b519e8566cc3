"""Scores of generated toy-world images, read by the oracles: prompt fidelity, identity, layout diversity.

The toy benchmark and the demo call these; each takes images (PIL or uint8 arrays) or oracle
readings, and the prompts that made them, and returns plain numbers.
"""

from __future__ import annotations

import math

import numpy as np

from layout_retouch.toyworld.oracles import Oracles, Reading
from layout_retouch.toyworld.render import BORDER, SIZE, radius_size_word
from layout_retouch.toyworld.scene import PERSONAL_CLASS, ParsedCaption, parse_caption

DIVERSITY_GRID = 4  # subject centers are binned on a DIVERSITY_GRID x DIVERSITY_GRID grid for entropy


def size_word(diameter: float) -> str:
    """The size word ("small", "medium", "large") whose radius band holds `diameter / 2`."""
    return radius_size_word(diameter / 2)


def position_followed(position: str, center: tuple[float, float]) -> bool:
    """Whether a subject centered at `center` is where a position phrase asks for.

    Left/right/top/bottom: the center lies beyond BORDER pixels from the middle line on that side;
    center: within BORDER pixels of the middle on both axes.
    """
    x, y = center
    mid = SIZE / 2
    return {
        "left": x < mid - BORDER, "right": x > mid + BORDER,
        "top": y < mid - BORDER, "bottom": y > mid + BORDER,
        "center": abs(x - mid) <= BORDER and abs(y - mid) <= BORDER,
    }[position]


def checks(asked: ParsedCaption, seen: Reading) -> dict[str, bool]:
    """One boolean per thing the prompt asks for: did the image do it?"""
    out: dict[str, bool] = {}
    if asked.scene:
        out["scene"] = seen.scene == asked.scene
    obj = PERSONAL_CLASS if asked.personal else asked.obj
    if obj:
        out["class"] = seen.obj == obj
    if asked.color and not asked.personal:
        out["color"] = seen.color == asked.color
    if asked.hat:
        out["accessory"] = seen.hat is not None
        out["accessory_color"] = seen.hat == asked.hat
    if asked.fence:
        out["occluder"] = seen.fence
    if asked.size:
        out["size"] = size_word(seen.size) == asked.size
    if asked.position:
        out["position"] = position_followed(asked.position, seen.center)
    return out


def prompt_fidelity(readings: list[Reading], prompts: list[str]) -> dict[str, dict[str, float]]:
    """Per asked-for attribute: the share of images that follow it, and how many images asked.

    Also "context": the share of images that follow every scene, accessory, occluder and position
    request their prompt makes (the context personalized models tend to lose).
    """
    per_key: dict[str, list[bool]] = {}
    context: list[bool] = []
    for reading, prompt in zip(readings, prompts, strict=True):
        result = checks(parse_caption(prompt), reading)
        for key, ok in result.items():
            per_key.setdefault(key, []).append(ok)
        asked = [ok for key, ok in result.items() if key in ("scene", "accessory", "occluder", "position")]
        if asked:
            context.append(all(asked))
    if context:
        per_key["context"] = context
    return {key: {"rate": float(np.mean(v)), "n": len(v)} for key, v in per_key.items()}


def identity(readings: list[Reading]) -> float:
    """Mean probability, over images, that the subject is the personal `sks star`."""
    return float(np.mean([r.identity for r in readings])) if readings else float("nan")


def layout_diversity(centers: list[tuple[float, float]], grid: int = DIVERSITY_GRID) -> dict[str, float]:
    """Spread of subject centers across seeds: per-axis and total standard deviation (pixels) and
    the entropy of their histogram on a grid x grid partition (bits; maximum log2(grid**2))."""
    c = np.asarray(centers, dtype=float).reshape(-1, 2)
    cells = np.clip((c / SIZE * grid).astype(int), 0, grid - 1)
    counts = np.bincount(cells[:, 1] * grid + cells[:, 0], minlength=grid * grid)
    p = counts[counts > 0] / counts.sum()
    return {
        "std_x": float(c[:, 0].std()), "std_y": float(c[:, 1].std()),
        "std": float(math.sqrt(c[:, 0].var() + c[:, 1].var())),
        "grid_entropy_bits": float(-(p * np.log2(p)).sum()),
        "grid_entropy_max_bits": math.log2(grid * grid),
    }


def score_images(images, prompts: list[str], oracles: Oracles | None = None) -> dict:
    """All measures for generated images and their prompts, in one dict (JSON-ready)."""
    oracles = oracles or Oracles.load()
    readings = oracles.read(images)
    return {
        "n_images": len(readings),
        "prompt_fidelity": prompt_fidelity(readings, prompts),
        "identity": identity(readings),
        "layout_diversity": layout_diversity([r.center for r in readings]),
    }
