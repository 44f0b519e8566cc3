"""Seeded samplers of the toy world's training data, one per use.

- `generic_sample`: what the vanilla text-to-image model learns from (solid colors only, never
  the personal star or its near-misses).
- `vae_sample`: generic scenes mixed with subjects of free hues and two-tone textures, so the VAE
  can reconstruct looks the generic captions never name (the personal star among them).
- `personal_sample` / `reference_sample`: the `sks star` anywhere, and as DreamBooth photos.
- `near_miss_sample`: stars that look almost like the personal one, for the identity oracle.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from layout_retouch.toyworld.render import NEAR_MISS, RenderResult, is_feasible, radius_size_word, render
from layout_retouch.toyworld.scene import (
    CLASSES,
    COLOR_NAMES,
    PERSONAL_CLASS,
    PERSONAL_TOKEN,
    SCENE_NAMES,
    SceneSpec,
    personal_spec,
    random_spec,
)

VAE_FREE_LOOK_SHARE = 0.5  # share of VAE training images whose subject has a free hue or texture
REFERENCE_RADIUS = (15.5, 18.0)  # DreamBooth photos: subject large ...
REFERENCE_JITTER = 4.0  # ... and within this many pixels of the center


def feasible_spec(rng: np.random.Generator, make=random_spec) -> SceneSpec:
    """A random spec whose size, position and context fit in the frame together."""
    while True:
        spec = make(rng)
        if is_feasible(spec):
            return spec


def is_held_out(spec: SceneSpec) -> bool:
    """About 1 in 7 (class, color, scene) triples never appear in the vanilla model's training data,
    so its quality can be measured on caption combinations it has not seen (each word alone it has)."""
    code = CLASSES.index(spec.obj) + 2 * COLOR_NAMES.index(spec.color) + 3 * SCENE_NAMES.index(spec.scene)
    return code % 7 == 0


def generic_sample(seed: int, split: str = "all", texture: float = 0.0) -> RenderResult:
    """A generic scene; `split` "train" skips held-out combinations, "held_out" keeps only those;
    `texture` as in `render`."""
    rng = np.random.default_rng([seed, 11])
    while True:
        spec = feasible_spec(rng)
        if split == "all" or is_held_out(spec) == (split == "held_out"):
            return render(spec, seed, texture=texture)


def vae_sample(seed: int) -> RenderResult:
    rng = np.random.default_rng([seed, 12])
    spec = feasible_spec(rng)
    if rng.random() < VAE_FREE_LOOK_SHARE:
        rgb = tuple(int(v) for v in rng.integers(0, 256, 3))
        rgb2 = tuple(int(v) for v in rng.integers(0, 256, 3)) if rng.random() < 0.7 else None
        spec = replace(spec, rgb=rgb, rgb2=rgb2, variant=int(rng.integers(0, 12)))
    return render(spec, seed)


def personal_sample(seed: int) -> RenderResult:
    """The personal star in a random generic context (for the oracles; never for the vanilla model)."""
    rng = np.random.default_rng([seed, 13])
    return render(feasible_spec(rng, personal_spec), seed, subject_words=f"{PERSONAL_TOKEN} {PERSONAL_CLASS}")


def near_miss_sample(seed: int) -> RenderResult:
    rng = np.random.default_rng([seed, 14])
    spec = feasible_spec(rng, personal_spec)
    spec = replace(spec, pattern="near_miss", variant=int(rng.integers(len(NEAR_MISS))))
    return render(spec, seed)


def reference_sample(seed: int, radius: tuple[float, float] = REFERENCE_RADIUS) -> RenderResult:
    """A DreamBooth-style photo of `sks star`: large (or in the `radius` range), near the center, plain studio
    background."""
    rng = np.random.default_rng([seed, 15])
    cx = 32 + float(rng.uniform(-REFERENCE_JITTER, REFERENCE_JITTER))
    cy = 32 + float(rng.uniform(-REFERENCE_JITTER, REFERENCE_JITTER))
    r = float(rng.uniform(*radius))
    spec = SceneSpec(obj=PERSONAL_CLASS, pattern="personal", scene="studio", size=radius_size_word(r), cx=cx, cy=cy,
                     radius=r)  # the size word is the caption's
    return render(spec, seed, subject_words=f"{PERSONAL_TOKEN} {PERSONAL_CLASS}")
