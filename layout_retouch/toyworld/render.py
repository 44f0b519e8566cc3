"""Deterministic renderer of the toy world's 64x64 scenes, with exact labels.

`render(spec, seed)` draws a `SceneSpec` (placing the subject first if the spec does not fix
where it is) and returns the image with its caption and the subject's exact mask, center and
size, so every oracle and measure of the toy world can be trained and checked against truth.
Shapes are drawn 4x supersampled with PIL and averaged down, so edges are anti-aliased and the
mask is the set of pixels the subject covers at least half of.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from layout_retouch.toyworld.scene import COLORS, SceneSpec, caption

SIZE = 64  # image side, pixels
SUPERSAMPLE = 4  # shapes are drawn at SIZE * SUPERSAMPLE and averaged down
RADIUS_RANGE = {"small": (5.5, 8.0), "medium": (10.0, 13.0), "large": (15.5, 19.0)}
SIZE_WORD_RANGE = {"small": (0.0, 9.0), "medium": (9.0, 14.5), "large": (14.5, 99.0)}  # radius bands
BORDER = 5.0  # the region a position phrase asks for ends this far from the image middle
FENCE_TOP = 30  # the fence covers rows FENCE_TOP..SIZE-1
HAT_HEIGHT = 0.75  # hat height, in subject radii above the subject's top
BOX_HALF = 0.8  # half side of a box, in radii
STAR_INNER = 0.45  # inner radius of the star's points, in radii
RING_INNER = 0.55  # hole radius of a ring, in radii
# Texture (issue 14's textured pilot): a smooth random luminance field over the whole image. Flat regions make
# a plain average of every same-colored pixel the best denoiser, which may be why the toy UNets' self-attention
# maps group by color and ignore position (toy world README, "Why the maps ignore position"); in photographs
# a pixel is best predicted by its neighbors.
TEXTURE_SIGMA = 6.0  # px, the Gaussian low-pass of the field: it varies over one or two latent pixels of the f=4 VAE

# The personal star: left half purple, right half yellow, white center dot. Its tones are palette
# colors on purpose: a pilot with off-palette magenta/cyan tones found the tiny VAE returned them
# desaturated (subject RMSE 52/255, against 33 for generic stars), so the subject would not have
# survived the VAE; this pattern reconstructs as well as a generic star (see README).
PERSONAL_TONES = (COLORS["purple"], COLORS["yellow"])
DOT_COLOR = (250, 250, 250)
DOT_RADIUS = 0.28  # the personal star's white center dot, in radii
# Near-miss stars for the identity oracle: (first tone, second tone, split, dot). Never in the
# generic text-to-image data; each differs from the personal star in one or two respects.
NEAR_MISS = (
    (PERSONAL_TONES[0], PERSONAL_TONES[1], "horizontal", True),
    (PERSONAL_TONES[0], PERSONAL_TONES[1], "vertical", False),
    (PERSONAL_TONES[0], COLORS["orange"], "vertical", True),
    (COLORS["red"], PERSONAL_TONES[1], "vertical", True),
    (PERSONAL_TONES[0], PERSONAL_TONES[0], "vertical", True),
    (COLORS["blue"], COLORS["green"], "vertical", True),
    (PERSONAL_TONES[0], PERSONAL_TONES[1], "stripes", True),
)
FENCE_COLOR = np.array([150, 105, 60], dtype=np.float32)


def radius_size_word(radius: float) -> str:
    """The size word ("small", "medium", "large") whose radius band holds `radius`."""
    return next(word for word, (lo, hi) in SIZE_WORD_RANGE.items() if lo <= radius < hi)


@dataclass
class RenderResult:
    """One rendered scene and its exact labels."""

    image: np.ndarray  # (64, 64, 3) uint8
    caption: str  # with optional parts randomly left out
    full_caption: str  # every part the image has
    mask: np.ndarray  # (64, 64) bool: subject pixels visible in the image
    amodal_mask: np.ndarray  # (64, 64) bool: the whole subject, including what the fence hides
    center: tuple[float, float]  # (x, y) of the subject's center, pixels
    size: float  # subject diameter (2 * radius), pixels
    spec: SceneSpec

    def pil(self) -> Image.Image:
        return Image.fromarray(self.image)


def _hat_room(spec: SceneSpec, radius: float) -> float:
    return HAT_HEIGHT * radius if spec.hat is not None else 0.0


def placement_range(spec: SceneSpec, radius: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """Allowed (x range, y range) of the subject center for the spec's position, size and context."""
    mid = SIZE / 2
    lo_x, hi_x = radius + 1, SIZE - 1 - radius
    lo_y, hi_y = radius + 1 + _hat_room(spec, radius), SIZE - 1 - radius
    if spec.position == "left":
        hi_x = min(hi_x, mid - BORDER - 5)
    elif spec.position == "right":
        lo_x = max(lo_x, mid + BORDER + 5)
    elif spec.position == "top":
        hi_y = min(hi_y, mid - BORDER - 5)
    elif spec.position == "bottom":
        lo_y = max(lo_y, mid + BORDER + 5)
    elif spec.position == "center":
        lo_x, hi_x = max(lo_x, mid - BORDER), min(hi_x, mid + BORDER)
        lo_y, hi_y = max(lo_y, mid - BORDER), min(hi_y, mid + BORDER)
    if spec.fence:  # at least the lower half of the subject stands behind the fence
        lo_y = max(lo_y, FENCE_TOP)
    return (lo_x, hi_x), (lo_y, hi_y)


def is_feasible(spec: SceneSpec) -> bool:
    """Whether the smallest radius of the spec's size word leaves room for its position and context."""
    (lx, hx), (ly, hy) = placement_range(spec, RADIUS_RANGE[spec.size][0])
    return lx <= hx and ly <= hy


def place(spec: SceneSpec, rng: np.random.Generator) -> SceneSpec:
    """Choose radius and center within the spec's size and position; shrinks the radius if needed."""
    if spec.cx is not None and spec.cy is not None and spec.radius is not None:
        return spec
    lo, hi = RADIUS_RANGE[spec.size]
    radius = float(rng.uniform(lo, hi))
    for _ in range(20):
        (lx, hx), (ly, hy) = placement_range(spec, radius)
        if lx <= hx and ly <= hy:
            break
        radius = max(lo, radius * 0.9) if radius > lo else radius * 0.9
    (lx, hx), (ly, hy) = placement_range(spec, radius)
    cx = float(rng.uniform(lx, hx)) if lx <= hx else (lx + hx) / 2
    cy = float(rng.uniform(ly, hy)) if ly <= hy else (ly + hy) / 2
    return replace(spec, cx=cx, cy=cy, radius=radius)


# ---------------------------------------------------------------- backgrounds

def _noise(rng: np.random.Generator, amount: float) -> np.ndarray:
    return rng.normal(0, amount, (SIZE, SIZE, 1)).astype(np.float32)


def _two_band(top, bottom, horizon: int) -> np.ndarray:
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:horizon] = top
    img[horizon:] = bottom
    return img


def background(scene: str, rng: np.random.Generator) -> np.ndarray:
    """(64, 64, 3) float background of a scene, with seeded variation."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    if scene == "beach":
        horizon = int(rng.integers(16, 24))
        img = _two_band((135, 200, 235), (230, 205, 150), horizon)
        img[horizon:horizon + int(rng.integers(3, 6))] = (40, 120, 200)
        img += _noise(rng, 5)
    elif scene == "snow":
        horizon = int(rng.integers(18, 26))
        img = _two_band((195, 210, 228), (246, 248, 252), horizon)
        flakes = rng.random((SIZE, SIZE)) < 0.04
        img[flakes & (yy < horizon)] = (252, 252, 255)
        img += _noise(rng, 3)
    elif scene == "grass":
        horizon = int(rng.integers(12, 20))
        img = _two_band((150, 200, 240), (70, 160, 60), horizon)
        blades = (rng.random((SIZE, SIZE)) < 0.12) & (yy > horizon)
        img[blades] = (40, 115, 35)
        img += _noise(rng, 4)
    elif scene == "night":
        img = np.empty((SIZE, SIZE, 3), np.float32)
        img[:] = (12, 16, 45)
        img += (yy / SIZE)[..., None] * np.array([10, 12, 30], np.float32)
        stars = rng.random((SIZE, SIZE)) < 0.015
        img[stars] = (235, 235, 255)
        mx, my = float(rng.uniform(6, 58)), float(rng.uniform(5, 14))
        img[(xx - mx) ** 2 + (yy - my) ** 2 <= 12] = (240, 238, 200)
        img += _noise(rng, 2)
    elif scene == "brick":
        img = np.empty((SIZE, SIZE, 3), np.float32)
        img[:] = (200, 190, 178)  # mortar
        off = int(rng.integers(0, 12))
        for row in range(0, SIZE, 7):
            shift = (off + (6 if (row // 7) % 2 else 0)) % 12
            for col in range(-12, SIZE, 12):
                tone = np.array([170, 72, 50], np.float32) * float(rng.uniform(0.85, 1.1))
                x0, y0 = max(col + shift, 0), row
                x1, y1 = min(col + shift + 11, SIZE), min(row + 6, SIZE)
                if x1 > x0:
                    img[y0:y1, x0:x1] = tone
        img += _noise(rng, 4)
    elif scene == "water":
        img = np.empty((SIZE, SIZE, 3), np.float32)
        img[:] = (30, 100, 180)
        phase, freq = float(rng.uniform(0, 6.3)), float(rng.uniform(0.25, 0.45))
        waves = np.sin(xx * freq + phase + yy * 0.3) > 0.85
        img[waves & ((yy.astype(int) % 6) < 2)] = (120, 180, 230)
        img += _noise(rng, 4)
    elif scene == "studio":
        base = float(rng.uniform(205, 225))
        img = np.repeat((base - yy * 0.4)[..., None], 3, axis=2)
        img *= np.array([1.0, 0.99, 0.97], np.float32)
        img += _noise(rng, 1.5)
    else:
        raise ValueError(f"unknown scene {scene!r}")
    return img * float(rng.uniform(0.93, 1.05))


# ---------------------------------------------------------------- shapes

def _coverage(draw_fn) -> np.ndarray:
    """Fraction of each pixel covered by what `draw_fn(ImageDraw, scale)` fills, (64, 64) float."""
    big = Image.new("L", (SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE), 0)
    draw_fn(ImageDraw.Draw(big), SUPERSAMPLE)
    arr = np.asarray(big, np.float32).reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE)
    return arr.mean(axis=(1, 3)) / 255.0


def _star_points(cx: float, cy: float, r: float, s: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        ang = -np.pi / 2 + k * np.pi / 5
        rad = r if k % 2 == 0 else r * STAR_INNER
        pts.append(((cx + rad * np.cos(ang)) * s, (cy + rad * np.sin(ang)) * s))
    return pts


def shape_coverage(obj: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Anti-aliased coverage (64, 64) of one subject shape."""
    def ell(d, s, rr, fill=255):
        d.ellipse([(cx - rr) * s, (cy - rr) * s, (cx + rr) * s, (cy + rr) * s], fill=fill)

    if obj == "ball":
        return _coverage(lambda d, s: ell(d, s, r))
    if obj == "box":
        h = BOX_HALF * r
        return _coverage(lambda d, s: d.rectangle([(cx - h) * s, (cy - h) * s, (cx + h) * s, (cy + h) * s],
                                                   fill=255))
    if obj == "cone":
        corners = [(cx, cy - r), (cx + 0.85 * r, cy + r), (cx - 0.85 * r, cy + r)]
        return _coverage(lambda d, s: d.polygon([(x * s, y * s) for x, y in corners], fill=255))
    if obj == "star":
        return _coverage(lambda d, s: d.polygon(_star_points(cx, cy, r, s), fill=255))
    if obj == "ring":
        return _coverage(lambda d, s: (ell(d, s, r), ell(d, s, RING_INNER * r, 0)))
    raise ValueError(f"unknown object class {obj!r}")


def _top_of(obj: str, cy: float, r: float) -> float:
    return cy - (BOX_HALF * r if obj == "box" else r)


def _fill(spec: SceneSpec, rng: np.random.Generator) -> np.ndarray:
    """(64, 64, 3) float colors of the subject's surface (pattern and shading)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    cx, cy, r = spec.cx, spec.cy, spec.radius
    if spec.pattern == "personal":
        tone_a, tone_b, split, dot = PERSONAL_TONES[0], PERSONAL_TONES[1], "vertical", True
    elif spec.pattern == "near_miss":
        tone_a, tone_b, split, dot = NEAR_MISS[spec.variant % len(NEAR_MISS)]
    elif spec.rgb2 is not None:  # free two-tone look, only for training the VAE
        tone_a, tone_b = spec.rgb, spec.rgb2
        split, dot = ("vertical", "horizontal", "stripes", "dots")[spec.variant % 4], spec.variant % 3 == 0
    else:
        tone_a = tone_b = spec.rgb if spec.rgb is not None else COLORS[spec.color]
        split, dot = "vertical", False
    if split == "vertical":
        second = xx >= cx
    elif split == "horizontal":
        second = yy >= cy
    elif split == "stripes":
        second = (np.floor((xx - cx) / max(r / 2.5, 1.0)) % 2) == 1
    else:  # dots
        second = ((np.floor(xx / 4) + np.floor(yy / 4)) % 2) == 1
    img = np.where(second[..., None], np.array(tone_b, np.float32), np.array(tone_a, np.float32))
    if dot:
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= (DOT_RADIUS * r) ** 2] = DOT_COLOR
    if spec.obj == "ball":  # soft light from the upper left
        d = np.sqrt((xx - cx + 0.35 * r) ** 2 + (yy - cy + 0.35 * r) ** 2) / (1.6 * r)
        img = img * (1.15 - 0.35 * np.clip(d, 0, 1))[..., None]
    return img * float(rng.uniform(0.95, 1.05))


def _fence_coverage(rng: np.random.Generator) -> np.ndarray:
    cov = np.zeros((SIZE, SIZE), np.float32)
    start, gap = int(rng.integers(0, 4)), int(rng.integers(7, 9))
    for x in range(start, SIZE, gap):
        cov[FENCE_TOP:, x:x + 3] = 1.0
    for y in (FENCE_TOP + 6, FENCE_TOP + 20):
        cov[y:y + 3, :] = 1.0
    return cov


def _hat_coverage(spec: SceneSpec) -> np.ndarray:
    cx, r = spec.cx, spec.radius
    top = _top_of(spec.obj, spec.cy, r)
    h = HAT_HEIGHT * r

    def draw(d, s):
        brim = (cx - 0.6 * r, top - 0.18 * h, cx + 0.6 * r, top + 0.05 * h)
        crown = (cx - 0.35 * r, top - h, cx + 0.35 * r, top - 0.1 * h)
        for rect in (brim, crown):
            d.rectangle([v * s for v in rect], fill=255)
    return _coverage(draw)


def texture_field(seed: int, amount: float) -> np.ndarray:
    """(64, 64, 1) smooth luminance field of standard deviation `amount` (gray levels), from its own stream of
    `seed`, so a textured render places and captions everything as the untextured one does."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(np.random.default_rng([seed, 2]).normal(size=(SIZE, SIZE)), TEXTURE_SIGMA, mode="wrap")
    return (field * (amount / field.std()))[..., None].astype(np.float32)


def render(spec: SceneSpec, seed: int, subject_words: str | None = None, texture: float = 0.0) -> RenderResult:
    """Render `spec` with everything random drawn from `seed`: placement, texture, caption drops.

    `subject_words` replaces "<color> <class>" in the caption (e.g. "sks star"); `texture` > 0 adds
    `texture_field` over the whole image.
    """
    rng = np.random.default_rng(seed)
    spec = place(spec, rng)
    img = background(spec.scene, rng)
    cov = shape_coverage(spec.obj, spec.cx, spec.cy, spec.radius)
    img = img * (1 - cov[..., None]) + _fill(spec, rng) * cov[..., None]
    visible = cov.copy()
    if spec.hat is not None:
        hat = _hat_coverage(spec)
        img = img * (1 - hat[..., None]) + np.array(COLORS[spec.hat], np.float32) * hat[..., None]
        visible *= 1 - hat
    if spec.fence:
        fence = _fence_coverage(rng)
        shade = FENCE_COLOR * float(rng.uniform(0.9, 1.1))
        img = img * (1 - fence[..., None]) + shade * fence[..., None]
        visible *= 1 - fence
    if texture > 0:
        img = img + texture_field(seed, texture)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    text_rng = np.random.default_rng([seed, 1])
    return RenderResult(
        image=image,
        caption=caption(spec, text_rng, subject=subject_words),
        full_caption=caption(spec, None, subject=subject_words),
        mask=visible >= 0.5,
        amodal_mask=cov >= 0.5,
        center=(float(spec.cx), float(spec.cy)),
        size=2.0 * float(spec.radius),
        spec=spec,
    )
