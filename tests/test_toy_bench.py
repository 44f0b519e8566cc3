"""Toy benchmark pieces: prompt sets, scoring of known renders against the renderer's truth, the
statistics (bootstrap intervals, per-prompt center spread) and which pipeline call makes which row."""

import json

import numpy as np
import pytest
from PIL import Image

from layout_retouch.errors import LayoutRetouchError, PromptError
from layout_retouch.toyworld.bench import calls_for
from layout_retouch.toyworld.bench_prompts import BenchPrompt, default_prompts, load_prompt_file
from layout_retouch.toyworld.bench_stats import center_spread, image_record, summarize
from layout_retouch.toyworld.bench_units import strip_cells, unit_path, write_unit
from layout_retouch.toyworld.measures import layout_diversity
from layout_retouch.toyworld.oracles import ORACLE_DIR, Oracles
from layout_retouch.toyworld.render import render
from layout_retouch.toyworld.scene import SceneSpec, parse_caption

# The locator's held-out p95 center error is under 1 px (models/oracles/metrics.json); 2 px is the
# same bar the oracle tests use on fresh renders.
CENTER_TOLERANCE_PX = 2.0
needs_oracles = pytest.mark.skipif(not (ORACLE_DIR / "locator.safetensors").exists(),
                                   reason="the toy oracles are not in the repository (train_oracles)")


# --- prompts
def test_default_prompts_split_into_normal_and_challenging():
    prompts = default_prompts()
    kinds = {p.template: p.kind for p in prompts}
    assert set(kinds.values()) == {"normal", "challenging"}
    assert kinds["a photo of a {} on the beach"] == "normal"
    assert kinds["a photo of a small {} wearing a red hat on the grass"] == "challenging"
    fixed = [p.template for p in prompts if p.fixes_position]
    assert fixed == ["a photo of a {} behind a fence on the left in the snow"]
    # The challenging set asks for every kind of context request between its prompts.
    asked = [parse_caption(p.scoring_text) for p in prompts if p.kind == "challenging"]
    assert any(a.size for a in asked) and any(a.hat for a in asked) and any(a.fence for a in asked)
    assert any(a.position for a in asked)
    assert len(default_prompts(quick=True)) == 2
    assert {p.kind for p in default_prompts(quick=True)} == {"normal", "challenging"}


def test_prompt_file_is_checked(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("# comment\na photo of a {} in the snow\n\na picture of a large {} at the top on the water\n")
    prompts = load_prompt_file(good)
    assert [p.kind for p in prompts] == ["normal", "challenging"]
    assert prompts[1].text("<sks> star") == "a picture of a large <sks> star at the top on the water"
    for text, message in (("a photo of a sks star on the beach", "exactly one"),
                          ("a photo of a {} {}", "exactly one"),
                          ("a photo of a {}", "nothing the oracles can check"),
                          ("a photo of a {} on the beach\na photo of a {} on the beach", "repeats")):
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(PromptError, match=message):
            load_prompt_file(bad)
    with pytest.raises(PromptError, match="does not exist"):
        load_prompt_file(tmp_path / "missing.txt")


# --- scoring a known image
@needs_oracles
def test_known_renders_are_scored_against_their_ground_truth(tmp_path):
    oracles = Oracles.load()
    personal = render(SceneSpec(obj="star", pattern="personal", color="purple", scene="night", size="large",
                                position="left", hat="red"), seed=11)
    solid = render(SceneSpec(obj="star", color="green", scene="beach", size="small", fence=True), seed=12)
    asked = BenchPrompt("a photo of a large {} wearing a red hat on the left at night")
    wrong = BenchPrompt("a photo of a small {} behind a fence on the right in the snow")

    # Through the benchmark's own write path: PNG strip then JSON, read back cell by cell.
    path = unit_path(tmp_path, "dreambooth", "V", asked)
    unit = write_unit(path, [personal.pil(), solid.pil()], asked, asked.text("sks star"), (0, 1), {"method": "V"},
                      1.0, oracles)
    assert json.loads(path.read_text()) == unit
    cells = strip_cells(path.with_suffix(".png"), 2)
    assert np.array_equal(np.asarray(cells[0]), personal.image) and np.array_equal(np.asarray(cells[1]), solid.image)

    first, second = unit["records"]
    assert np.hypot(*np.subtract(first["center"], personal.center)) < CENTER_TOLERANCE_PX
    assert np.hypot(*np.subtract(second["center"], solid.center)) < CENTER_TOLERANCE_PX
    assert first["checks"] == {"scene": True, "class": True, "accessory": True, "accessory_color": True,
                               "size": True, "position": True}
    assert first["fidelity"] == 1.0
    # The locator's mask IoU is 0.87 on held-out renders: its pixel count is close to the true one.
    assert abs(first["subject_pixels"] - personal.mask.sum()) < 0.3 * personal.mask.sum()
    assert first["identity"] > 0.5 > second["identity"]
    # The solid star follows none of this prompt's context: not the scene, hat, size or position.
    assert second["fidelity"] == 0.0 and not second["checks"]["accessory"]
    # The same image scored against a prompt it does not follow.
    reading = oracles.read([personal.pil()])[0]
    record = image_record(0, reading, wrong.scoring_text)
    assert record["checks"] == {"scene": False, "class": True, "occluder": False, "size": False, "position": False}
    assert record["fidelity"] == 0.0
    assert image_record(1, oracles.read([solid.pil()])[0], wrong.scoring_text)["checks"]["occluder"]


# --- statistics
def records(centers, identity, fidelity):
    return [{"seed": s, "center": list(c), "identity": i, "fidelity": f, "checks": {"scene": f == 1.0},
             "subject_pixels": 40}
            for s, (c, i, f) in enumerate(zip(centers, identity, fidelity, strict=True))]


def test_summary_measures_and_intervals():
    rng = np.random.default_rng(0)
    spread_out = rng.uniform(5, 59, (16, 2))
    pinned = 32 + rng.normal(0, 0.5, (16, 2))
    groups = {
        "wide": records(spread_out, rng.uniform(0, 1, 16), rng.integers(0, 2, 16).astype(float)),
        "pinned": records(pinned, np.full(16, 0.9), np.ones(16)),
    }
    summary = summarize(groups, position_free={"wide"})
    expected_spread = layout_diversity(spread_out.tolist())["std"]  # only the position-free prompt
    assert summary["diversity"]["mean"] == pytest.approx(expected_spread, abs=1e-3)
    identity = np.mean([r["identity"] for g in groups.values() for r in g])
    assert summary["identity"]["mean"] == pytest.approx(identity, abs=1e-4)
    for key in ("identity", "prompt_fidelity", "diversity"):
        m = summary[key]
        assert m["ci_low"] <= m["mean"] + 1e-3 and m["mean"] - 1e-3 <= m["ci_high"] and m["ci_low"] < m["ci_high"]
    assert summary == summarize(groups, position_free={"wide"})  # fixed bootstrap seed: reproducible
    with_pinned = summarize(groups)  # counting the pinned prompt halves the mean spread, roughly
    assert with_pinned["diversity"]["mean"] < 0.6 * summary["diversity"]["mean"]
    assert summary["attributes"]["scene"]["n"] == 32 and summary["n_images"] == 32


def test_more_seeds_narrow_the_interval():
    rng = np.random.default_rng(1)
    few = {"p": records(rng.uniform(0, 64, (8, 2)), rng.uniform(0, 1, 8), np.ones(8))}
    many = {"p": records(rng.uniform(0, 64, (128, 2)), rng.uniform(0, 1, 128), np.ones(128))}
    width = lambda s: s["identity"]["ci_high"] - s["identity"]["ci_low"]
    assert width(summarize(many)) < width(summarize(few))


def test_center_spread_matches_layout_diversity_and_seeds_must_agree():
    c = np.random.default_rng(2).uniform(0, 64, (3, 10, 2))
    assert np.allclose(center_spread(c), [layout_diversity(x.tolist())["std"] for x in c])
    groups = {"a": records(c[0], np.zeros(10), np.ones(10)), "b": records(c[1], np.zeros(10), np.ones(10))[::-1]}
    with pytest.raises(ValueError, match="same"):
        summarize(groups)


def test_row_two_comes_from_the_full_method_call():
    assert calls_for(("I", "II", "III", "IV", "V")) == [("I", ("I",)), ("V", ("V", "II")), ("IV", ("IV",)),
                                                         ("III", ("III",))]
    assert calls_for(("II", "IV")) == [("IV", ("IV", "II"))]
    assert calls_for(("I", "II")) == [("I", ("I",)), ("II", ("II",))]


def test_strip_round_trip(tmp_path):
    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(3)]
    from layout_retouch.toyworld.bench_units import strip_image

    strip_image(images).save(tmp_path / "s.png")
    assert [c.getpixel((0, 0)) for c in strip_cells(tmp_path / "s.png", 3)] == [(0, 0, 0), (40, 0, 0), (80, 0, 0)]


def test_step_indexed_settings_keep_their_share_of_the_trajectory(tmp_path):
    from layout_retouch.toyworld.bench import BenchSettings, sweep_points

    paper = BenchSettings(out=tmp_path, prompts=default_prompts(), seeds=(0,), steps=50).config("V")
    short = BenchSettings(out=tmp_path, prompts=default_prompts(), seeds=(0,), steps=25).config("V")
    assert (paper.ref_start_step, paper.num_vanilla_steps) == (4, 5)  # the paper's S_ref and T_l
    assert (short.ref_start_step, short.mask_start, short.num_vanilla_steps) == (2, 2, 2)
    points = sweep_points(BenchSettings(out=tmp_path, prompts=default_prompts(), seeds=(0,), steps=50))
    assert sorted(p["changes"]["vanilla_steps"] for p in points.values() if "vanilla_steps" in p["swept"]) == \
        [0, 5, 10, 15, 20]
    # The default point is shared by the three sweeps, not run three times.
    assert points["tl5_sref4_smask4"]["swept"] == ["vanilla_steps", "ref_start_step", "mask_start_step"]


def test_toy_bench_config_file_reaches_every_row_and_bad_keys_fail_early(tmp_path):
    from layout_retouch.cli import build_parser
    from layout_retouch.cli.toy_bench import settings_from_args

    good = tmp_path / "tl.json"
    good.write_text('{"vanilla_steps": 15}')
    settings = settings_from_args(build_parser().parse_args(["toy-bench", "--quick", "--steps", "50",
                                                            "--config", str(good)]))
    assert settings.overrides == {"vanilla_steps": 15}
    assert settings.config("V").num_vanilla_steps == 15 and settings.config("II").num_vanilla_steps == 15
    assert settings.config("I").num_vanilla_steps == 0  # row I stays plain personalized sampling
    for text, words in (('{"vanila_steps": 15}', "unknown config keys: vanila_steps"),
                        ('{"method": "V"}', "chosen per row")):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(LayoutRetouchError, match=words):
            settings_from_args(build_parser().parse_args(["toy-bench", "--quick", "--config", str(bad)]))
