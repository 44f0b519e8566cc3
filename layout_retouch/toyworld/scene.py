"""The toy world's vocabulary, its structured scene description and the caption grammar.

Everything the renderer can draw is named here once, so the renderer, the tokenizer, the oracles
and the measures agree on the same words. Captions are made from templates with parts randomly
left out, so a model also learns to vary what a caption does not fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

CLASSES = ("ball", "box", "cone", "star", "ring")
COLORS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 225, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
}
COLOR_NAMES = tuple(COLORS)
# Scene name -> the phrase a caption uses for it.
SCENES = {
    "beach": "on the beach",
    "snow": "in the snow",
    "grass": "on the grass",
    "night": "at night",
    "brick": "in front of a brick wall",
    "water": "on the water",
    "studio": "in a studio",
}
SCENE_NAMES = tuple(SCENES)
SIZES = ("small", "medium", "large")  # "medium" has no word in captions
# Position name -> phrase; "anywhere" has no phrase.
POSITIONS = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
POSITION_NAMES = tuple(POSITIONS) + ("anywhere",)

# The personal subject: a rare word of the vocabulary that no generic caption uses.
PERSONAL_TOKEN = "sks"
PERSONAL_CLASS = "star"
# Patterns a subject can carry. "solid" is the only one in the generic text-to-image data;
# "personal" is the `sks star` instance; the others are near-misses for the identity oracle.
PATTERNS = ("solid", "personal", "near_miss")

# Probability that a caption leaves out each optional part the image has (the class word is
# always kept; accessories and occluders are rarely left out so the model learns to draw them
# when asked).
DROP_PROB = {
    "color": 0.15,
    "size": 0.2,
    "scene": 0.15,
    "position": 0.2,
    "accessory": 0.05,
    "occluder": 0.05,
}
# Share of generic scenes that have each optional part.
HAS_PROB = {"accessory": 0.25, "occluder": 0.2, "position": 0.6}

CAPTION_PREFIXES = ("a photo of", "a picture of", "an image of")


@dataclass(frozen=True)
class SceneSpec:
    """Everything that fixes a rendered image except the pixel-level noise seed."""

    obj: str = "star"
    color: str = "red"
    scene: str = "studio"
    size: str = "medium"
    position: str = "anywhere"
    hat: str | None = None  # hat color, or None for no accessory
    fence: bool = False
    pattern: str = "solid"
    # Exact geometry, chosen by `place` from size and position; None until placed.
    cx: float | None = None
    cy: float | None = None
    radius: float | None = None
    # Extra look parameters for patterned subjects (near-miss variant index, free hues for the VAE).
    variant: int = 0
    rgb: tuple[int, int, int] | None = None  # overrides `color` (VAE training on free hues)
    rgb2: tuple[int, int, int] | None = None  # second tone of a two-tone pattern


def random_spec(rng: np.random.Generator, obj: str | None = None) -> SceneSpec:
    """A generic scene: solid-colored subject, random context, not yet placed."""
    hat = None
    color = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
    if rng.random() < HAS_PROB["accessory"]:
        hat = str(rng.choice([c for c in COLOR_NAMES if c != color]))
    return SceneSpec(
        obj=obj or CLASSES[rng.integers(len(CLASSES))],
        color=color,
        scene=SCENE_NAMES[rng.integers(len(SCENE_NAMES))],
        size=SIZES[rng.integers(len(SIZES))],
        position=POSITION_NAMES[rng.integers(len(POSITIONS))] if rng.random() < HAS_PROB["position"]
        else "anywhere",
        hat=hat,
        fence=bool(rng.random() < HAS_PROB["occluder"]),
    )


def personal_spec(rng: np.random.Generator, **overrides) -> SceneSpec:
    """The `sks star`: the one star with the personal two-tone pattern."""
    spec = replace(random_spec(rng, obj=PERSONAL_CLASS), pattern="personal", color="purple")
    if spec.hat in ("purple", "yellow"):  # a hat in one of the subject's own tones would blend in
        spec = replace(spec, hat="blue")
    return replace(spec, **overrides)


def caption(spec: SceneSpec, rng: np.random.Generator | None = None, subject: str | None = None,
            drop: dict[str, float] | None = None) -> str:
    """Caption of `spec`; with `rng`, optional parts are left out at the rates of DROP_PROB
    (or of `drop`, where it names a part).

    `subject` replaces the "<color> <class>" words (e.g. "sks star" for the personal subject).
    """
    rates = DROP_PROB if drop is None else {**DROP_PROB, **drop}

    def keep(part: str) -> bool:
        return rng is None or rng.random() >= rates[part]

    prefix = CAPTION_PREFIXES[0] if rng is None else CAPTION_PREFIXES[rng.integers(len(CAPTION_PREFIXES))]
    words = [prefix, "a"]
    if spec.size != "medium" and keep("size"):
        words.append(spec.size)
    if subject is not None:
        words.append(subject)
    else:
        if spec.pattern == "solid" and spec.rgb is None and keep("color"):
            words.append(spec.color)
        words.append(spec.obj)
    if spec.hat is not None and keep("accessory"):
        words.append(f"wearing a {spec.hat} hat")
    if spec.fence and keep("occluder"):
        words.append("behind a fence")
    if spec.position != "anywhere" and keep("position"):
        words.append(POSITIONS[spec.position])
    if keep("scene"):
        words.append(SCENES[spec.scene])
    return " ".join(words)


@dataclass(frozen=True)
class ParsedCaption:
    """What a caption asks for; None where it does not say."""

    obj: str | None = None
    color: str | None = None
    scene: str | None = None
    size: str | None = None
    position: str | None = None
    hat: str | None = None
    fence: bool = False
    personal: bool = False


def parse_caption(text: str) -> ParsedCaption:
    """Read the world's words back out of a caption (or any prompt using them)."""
    t = " " + re.sub(r"[^a-z ]", " ", text.lower()) + " "
    t = re.sub(r"\s+", " ", t)
    hat = None
    m = re.search(r" wearing an? (\w+) hat ", t)
    if m and m.group(1) in COLORS:
        hat = m.group(1)
        t = t.replace(m.group(0), " ")
    found = lambda names: next((n for n in names if f" {n} " in t), None)
    scene = next((name for name, phrase in SCENES.items() if f" {phrase} " in t), None)
    position = next((name for name, phrase in POSITIONS.items() if f" {phrase} " in t), None)
    return ParsedCaption(
        obj=found(CLASSES),
        color=found(COLOR_NAMES),
        scene=scene,
        size=found(("small", "large")),
        position=position,
        hat=hat,
        fence=" behind a fence " in t,
        personal=f" {PERSONAL_TOKEN} " in t,
    )


def vocabulary() -> list[str]:
    """Every word a caption of this world can contain, plus the personal token."""
    words: set[str] = set()
    for text in (
        *CAPTION_PREFIXES, *SCENES.values(), *POSITIONS.values(), "a an wearing hat behind fence",
        " ".join(CLASSES), " ".join(COLOR_NAMES), "small large", "photo picture image of the",
    ):
        words.update(text.split())
    words.add(PERSONAL_TOKEN)
    return sorted(words)
