"""The toy world's renderer, caption grammar and tokenizer: determinism and exact labels."""

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from layout_retouch.toyworld.datasets import (
    generic_sample,
    is_held_out,
    near_miss_sample,
    personal_sample,
    reference_sample,
)
from layout_retouch.toyworld.references import REFERENCE_DIR, write_references
from layout_retouch.toyworld.render import SIZE_WORD_RANGE, render, texture_field
from layout_retouch.toyworld.scene import (
    CLASSES,
    COLORS,
    PERSONAL_TOKEN,
    SceneSpec,
    parse_caption,
    vocabulary,
)
from layout_retouch.toyworld.tokenizer import build_tokenizer

SEEDS = range(40)


def test_render_is_deterministic_per_seed():
    a, b, c = generic_sample(7), generic_sample(7), generic_sample(8)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, c.image)


def test_texture_changes_the_pixels_only():
    """A textured render is the flat one plus a smooth field: same placement, caption and mask."""
    flat, textured = generic_sample(7), generic_sample(7, texture=20)
    assert textured.spec == flat.spec and textured.caption == flat.caption
    assert np.array_equal(textured.mask, flat.mask)
    difference = textured.image.astype(float) - flat.image.astype(float)
    assert 10 < difference.std() < 25  # about the field's 20 gray levels, less where clipping bites
    field = texture_field(7, 20)[..., 0]
    assert field.std() == pytest.approx(20, rel=1e-3)
    # smooth: neighbours agree far more than pixels 24 apart
    assert np.corrcoef(field[:, :-1].ravel(), field[:, 1:].ravel())[0, 1] > 0.8
    assert abs(np.corrcoef(field[:, :-24].ravel(), field[:, 24:].ravel())[0, 1]) < 0.3


@pytest.mark.parametrize("obj", CLASSES)
def test_mask_matches_center_and_size(obj):
    spec = SceneSpec(obj=obj, color="blue", scene="grass", size="large", cx=30.0, cy=34.0, radius=16.0)
    r = render(spec, seed=1)
    ys, xs = np.nonzero(r.amodal_mask)
    half = r.size / 2
    # the subject fills the square of side `size` around its center (pixel i spans [i, i+1))...
    assert xs.min() >= r.center[0] - half - 1 and xs.max() + 1 <= r.center[0] + half + 1
    assert ys.min() >= r.center[1] - half - 1 and ys.max() + 1 <= r.center[1] + half + 1
    assert max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) >= 1.5 * half
    # ... and is centered left to right where the label says (every class is mirror-symmetric)
    assert abs((xs.min() + xs.max() + 1) / 2 - r.center[0]) <= 1.0
    assert np.array_equal(r.mask, r.amodal_mask)  # nothing hides it


def test_fence_and_hat_hide_part_of_the_subject():
    spec = SceneSpec(obj="ball", color="red", scene="snow", size="large", hat="blue", fence=True,
                     cx=32.0, cy=40.0, radius=15.0)
    r = render(spec, seed=3)
    assert (r.mask <= r.amodal_mask).all()
    assert 0.2 * r.amodal_mask.sum() < r.mask.sum() < r.amodal_mask.sum()
    # the hat is painted in its color right above the subject
    hat_rgb = r.image[int(40 - 15 - 6), 32].astype(int)
    assert hat_rgb[2] > 150 and hat_rgb[0] < 100


def test_subject_color_is_the_named_color_where_visible():
    for seed in SEEDS:
        r = generic_sample(seed)
        if r.spec.obj == "ball" or r.mask.sum() < 10:
            continue  # a ball is shaded
        mean = r.image[r.mask].astype(float).mean(0)
        assert np.abs(mean - np.array(COLORS[r.spec.color])).max() < 40, r.full_caption


def test_captions_say_what_the_image_has():
    for seed in SEEDS:
        r = generic_sample(seed)
        full, short = parse_caption(r.full_caption), parse_caption(r.caption)
        assert full.obj == short.obj == r.spec.obj
        assert full.scene == r.spec.scene and full.color == r.spec.color
        assert full.hat == r.spec.hat and full.fence == r.spec.fence
        assert full.position == (None if r.spec.position == "anywhere" else r.spec.position)
        # a left-out part is left out, never changed
        for field in ("scene", "color", "size", "position", "hat"):
            assert getattr(short, field) in (None, getattr(full, field))
        lo, hi = SIZE_WORD_RANGE[r.spec.size]
        assert lo <= r.size / 2 < hi


def test_parts_are_sometimes_left_out():
    captions = [generic_sample(s) for s in range(200)]
    assert any(c.caption != c.full_caption for c in captions)
    assert any(parse_caption(c.caption).scene is None for c in captions)


def test_personal_subject_is_never_in_generic_data():
    for seed in range(200):
        r = generic_sample(seed)
        assert r.spec.pattern == "solid" and PERSONAL_TOKEN not in r.caption.split()
    assert personal_sample(0).spec.pattern == "personal"
    assert parse_caption(personal_sample(0).caption).personal
    assert near_miss_sample(0).spec.pattern == "near_miss"


def test_references_are_large_centered_studio_shots():
    for seed in range(5):
        r = reference_sample(seed)
        assert r.spec.scene == "studio" and r.spec.pattern == "personal"
        assert r.size >= 30 and np.hypot(r.center[0] - 32, r.center[1] - 32) <= 6
        assert "sks star" in r.caption


def test_reference_photos_and_masks_as_shipped(tmp_path):
    exact, grown = tmp_path / "exact", tmp_path / "grown"
    (path,) = write_references(tmp_path / "photos", seeds=(0,), masks=exact)
    write_references(tmp_path / "photos", seeds=(0,), masks=grown, mask_dilate=2)
    assert path.read_bytes() == (REFERENCE_DIR / path.name).read_bytes()
    mask = np.asarray(Image.open(exact / path.name)) > 0
    assert np.array_equal(mask, reference_sample(0).mask)
    wider = np.asarray(Image.open(grown / path.name)) > 0
    assert (wider >= mask).all() and wider.sum() > mask.sum()
    (medium,) = write_references(tmp_path / "medium", seeds=(0,), radius=(10.0, 13.0))  # smaller, same place
    small = reference_sample(0, (10.0, 13.0))
    assert np.array_equal(np.asarray(Image.open(medium)), np.asarray(small.pil()))
    assert 20 <= small.size <= 26 and small.center == reference_sample(0).center and "large" not in small.caption


def test_held_out_split():
    assert all(not is_held_out(generic_sample(s, split="train").spec) for s in range(30))
    assert all(is_held_out(generic_sample(s, split="held_out").spec) for s in range(30))


def test_tokenizer_has_every_world_word_as_one_token():
    tok = build_tokenizer()
    for word in vocabulary():
        assert len(tok.tokenize(word)) == 1, word
    assert PERSONAL_TOKEN in vocabulary()
    ids = tok("a photo of a sks star", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == tok.model_max_length and ids[0] == tok.bos_token_id
    # unknown words still encode, letter by letter
    assert tok.tokenize("a jungle") == ["a</w>", "j", "u", "n", "g", "l", "e</w>"]
    assert tok.add_tokens(["<sks>"]) == 1 and tok.tokenize("a <sks> star")[1] == "<sks>"


def test_spec_changes_change_the_image():
    base = SceneSpec(obj="box", color="red", scene="beach", size="medium", cx=32.0, cy=32.0, radius=11.0)
    a = render(base, seed=0).image
    for change in ({"scene": "night"}, {"color": "green"}, {"obj": "ring"}, {"hat": "blue"}):
        assert not np.array_equal(a, render(replace(base, **change), seed=0).image), change
