"""The web app's functions without a browser: requests, runs, PNGs, compare rows, progress, Stop, errors."""

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from layout_retouch.cli.demo import TOY_MODELS
from layout_retouch.cli.serve import load
from layout_retouch.errors import LayoutRetouchError
from layout_retouch.web.engine import (
    MASKS,
    MAX_IMAGES,
    Outcome,
    make_request,
    parse_seeds,
    parse_vanilla_steps,
    run_request,
)

PROMPT = "a photo of a sks star on the beach"
REFERENCE = TOY_MODELS / "references" / "sks_star_02.png"


def serve_args(**changes) -> argparse.Namespace:
    from layout_retouch.cli import build_parser

    args = build_parser("serve").parse_args(["serve", "--threads", "1"])
    for name, value in changes.items():
        setattr(args, name, value)
    return args


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("web")
    return load(serve_args(out=str(out / "images"), inversion_cache_dir=str(out / "cache")))


def fields(**changes) -> dict:
    base = dict(prompts=PROMPT, seeds="7", num_images=1, method="V", steps=6, reference=str(REFERENCE))
    return {**base, **changes}


def final_run(engine, **changes) -> Outcome:
    outcomes = list(run_request(engine, fields(**changes)))
    assert outcomes[-1].ok, outcomes[-1].message
    return outcomes[-1]


def parameters(path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.text["parameters"])


def direct(engine, method: str, seed: int, steps: int = 6, n: int = 1):
    """The pipeline called as `generate` calls it, for comparison with what the page shows."""
    config = engine.models.defaults.replace(method=method, num_inference_steps=steps)
    return engine.models.pipe(PROMPT, reference_image=REFERENCE if config.uses_reference else None, config=config,
                              num_images_per_prompt=n, generator=torch.Generator("cpu").manual_seed(seed))


def same(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def levels_apart(a: Image.Image, b: Image.Image) -> int:
    pixels = [np.asarray(image.convert("RGB"), dtype=np.int16) for image in (a, b)]
    return int(np.abs(pixels[0] - pixels[1]).max())


# --- parsing and checks (no model runs)
def test_parse_seeds():
    assert parse_seeds("42, 43,42 7") == (42, 43, 7)
    for bad in ("", "4x", "-1", "1.5"):
        with pytest.raises(LayoutRetouchError):
            parse_seeds(bad)


def test_parse_vanilla_steps_count_or_fraction():
    assert parse_vanilla_steps(5.0) == 5 and isinstance(parse_vanilla_steps(5.0), int)
    assert parse_vanilla_steps(0.1) == 0.1
    for bad in (-1, "x", float("nan")):
        with pytest.raises(LayoutRetouchError):
            parse_vanilla_steps(bad)


def test_toy_world_is_the_default(engine):
    models = engine.models
    assert models.token == "sks" and models.pipe.models.class_word == "star"
    assert sorted(p.name for p in models.references) == [f"sks_star_0{i}.png" for i in range(5)]
    assert models.defaults.segmenter == "toy"  # the demo's settings for the toy UNet
    assert models.defaults.target_start == "layout" and models.defaults.vanilla_steps == 0.4  # and for the world
    assert "sks" in models.example_prompt


def test_request_fields_reach_the_config(engine):
    request = make_request(engine.models, **fields(vanilla_steps=3, ref_start_step=2, mask_start_step=5, tau=0.3,
                                                   guidance=4.0, seeds="1,2", num_images=2))
    c = request.config
    assert (c.method, c.num_inference_steps, c.num_vanilla_steps, c.ref_start_step, c.mask_start, c.tau,
            c.guidance_scale) == ("V", 6, 3, 2, 5, 0.3, 4.0)
    assert request.seeds == (1, 2) and request.num_images == 2 and request.calls == 2
    assert make_request(engine.models, **fields(vanilla_steps=0.5)).config.num_vanilla_steps == 3
    assert make_request(engine.models, **fields(ref_start_step=2, mask_start_step=None)).config.mask_start == 2
    assert make_request(engine.models, **fields(compare=True, method="I")).config.method == "V"
    assert make_request(engine.models, **fields()).config.target_start == "layout"  # the world's, unless asked
    for start, first_step in (("noise", 0), ("layout", 3)):
        config = make_request(engine.models, **fields(target_start=start, vanilla_steps=3)).config
        assert (config.target_start, config.target_start_step) == (start, first_step)


@pytest.mark.parametrize("changes, words", [
    (dict(prompts="a photo of a star on the beach"), "does not contain the personal token"),
    (dict(prompts="  \n "), "no prompt"),
    (dict(reference=None), "reference photo"),
    (dict(reference=None, compare=True), "reference photo"),
    (dict(seeds="one"), "seeds must be integers"),
    (dict(vanilla_steps=9), "vanilla_steps=9"),  # more than the 6 steps: the config's own check
    (dict(tau=1.0), "tau"),
    (dict(steps=0), "steps"),
    (dict(num_images=MAX_IMAGES + 1), f"at most {MAX_IMAGES}"),
    (dict(method="VI"), "unknown method"),
    (dict(mask_start_step="soon"), "S_mask"),
    (dict(target_start="middle"), "target_start"),
])
def test_bad_requests_are_one_clear_message(engine, changes, words):
    with pytest.raises(LayoutRetouchError, match=words):
        make_request(engine.models, **fields(**changes))
    outcomes = list(run_request(engine, fields(**changes)))
    assert len(outcomes) == 1 and not outcomes[0].ok
    assert outcomes[0].message.startswith("Error: ") and words.split()[0] in outcomes[0].message
    assert "Traceback" not in outcomes[0].message and outcomes[0].tiles == []


def test_unreadable_or_missing_reference(engine, tmp_path):
    broken = tmp_path / "photo.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    message = list(run_request(engine, fields(reference=str(broken))))[-1].message
    assert message.startswith("Error: ") and "cannot be read as an image" in message
    message = list(run_request(engine, fields(reference=str(tmp_path / "gone.png"))))[-1].message
    assert "does not exist" in message


def test_methods_without_reference_need_none(engine):
    request = make_request(engine.models, **fields(method="II", reference=None))
    assert request.reference is None and request.config.method == "II"


# --- runs
def test_method_v_shows_layout_and_final_as_the_pipeline_makes_them(engine):
    outcome = final_run(engine)
    assert [t.kind for t in outcome.tiles] == ["layout", "final"] and outcome.columns == 2
    assert outcome.message.startswith("Done: 1 image(s)")
    expected = direct(engine, "V", 7)
    layout, final = (Image.open(t.path) for t in outcome.tiles)
    # The page's run made the reference's features, the direct call reads them from the cache: with Stage 2's
    # first steps riding in Stage 1's calls (pipeline_stages) the calls' batches differ, and so may the float
    # rounding (one level in one channel of one pixel was seen).
    assert levels_apart(final, expected.images[0]) <= 1 and same(layout, expected.layout_images[0])
    p = parameters(outcome.tiles[1].path)
    assert (p["prompt"], p["seed"], p["index"], p["config"]["method"], p["config"]["num_inference_steps"]) == \
        (PROMPT, 7, 0, "V", 6)
    assert p["reference"] == str(REFERENCE)  # an upload of an offered photo is named by that photo
    assert p["models"] == engine.models.pipe.models.sources
    assert p["prompts"]["vanilla"] == "a photo of a star on the beach"
    assert p["output_key"]["config"]["vanilla_steps"] == round(0.4 * 6)  # the world's T_l resolved, as generate keys it
    assert parameters(outcome.tiles[0].path)["image"] == "layout"


def test_png_parameters_match_generate(engine, tmp_path):
    """The same fields as `layout-retouch generate` writes, including its output key."""
    from layout_retouch.cli import main

    out = tmp_path / "generate"
    code = main(["generate", "--base", engine.models.model_args.base, "--personalized",
                 engine.models.model_args.personalized, "--token", "sks", "--class-word", "star", "--reference",
                 str(REFERENCE), "--prompt", PROMPT, "--seeds", "7", "--steps", "6", "--segmenter", "toy",
                 "--mask-attention-resolution", "0.5", "--vanilla-steps", "0.4", "--target-start", "layout",
                 "--out", str(out), "--quiet", "--threads", "1",
                 "--inversion-cache-dir", engine.models.defaults.inversion_cache_dir])
    assert code == 0
    written = parameters(next(out.rglob("*.png")))
    page = parameters(final_run(engine).tiles[1].path)
    assert set(page) == set(written)
    assert page["output_key"] == written["output_key"]
    assert page["config"] == written["config"] and page["prompts"] == written["prompts"]


def test_masks_and_reconstruction_on_request(engine):
    outcome = final_run(engine, show_masks=True, num_images=2)
    kinds = [t.kind for t in outcome.tiles]
    row = ["layout", "final", "reference", "reference_reconstruction", *(f"mask_{m}" for m in MASKS)]
    assert kinds == row * 2 and outcome.columns == 4  # an image's 8 tiles in two gallery rows
    assert [t.row[2] for t in outcome.tiles] == [0] * len(row) + [1] * len(row)
    mask = np.asarray(Image.open(outcome.tiles[kinds.index("mask_final")].path))
    assert mask.shape[:2] == Image.open(outcome.tiles[1].path).size[::-1]


def test_gallery_columns_keep_an_image_in_whole_rows(engine):
    assert final_run(engine, method="IV", show_masks=True).columns == 4  # layout, final, reference, reconstruction
    assert final_run(engine, method="III", show_masks=True).columns == 3  # no layout, no mask blending
    assert final_run(engine, method="I", seeds="1,2,3", show_masks=True).columns == 3  # one tile an image


def test_compare_rows_are_i_ii_v_on_one_seed(engine):
    outcome = final_run(engine, compare=True, method="III", seeds="3")
    assert [(t.method, t.kind) for t in outcome.tiles] == [("I", "final"), ("V", "layout"), ("V", "final")]
    assert [t.caption.split(" ")[0] for t in outcome.tiles] == ["I", "II:", "V"]
    assert same(Image.open(outcome.tiles[0].path), direct(engine, "I", 3).images[0])
    full = direct(engine, "V", 3)
    assert same(Image.open(outcome.tiles[1].path), full.layout_images[0])
    assert same(Image.open(outcome.tiles[2].path), full.images[0])
    # Row II's own output is Stage 1 alone; V's layout is that Stage 1 (the inversion rides in its batch).
    alone = np.asarray(direct(engine, "II", 3).images[0], dtype=np.float32)
    assert np.abs(alone - np.asarray(full.layout_images[0], dtype=np.float32)).max() <= 2


def test_progress_follows_both_stages_of_every_run(engine):
    steps = []
    outcomes = list(run_request(engine, fields(seeds="1,2"), steps.append))
    assert outcomes[-1].ok and len(outcomes) == 3  # one gallery per finished run, then the final message
    fractions = [s.fraction for s in steps]
    assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] == 1.0
    texts = " ".join(s.text for s in steps)
    assert "run 1/2" in texts and "run 2/2" in texts and "stage 1 layout" in texts and "stage 2 retouch" in texts


def test_stop_ends_the_run_between_steps_and_keeps_finished_images(engine):
    stops = []

    def press_stop_in_second_run(step):
        if step.text.startswith("run 2/2") and "stage 2 retouch, step 2/" in step.text:
            stops.append(engine.stop())

    outcomes = list(run_request(engine, fields(seeds="1,2"), press_stop_in_second_run))
    assert stops == [True]
    last = outcomes[-1]
    # Stage 2's first steps ride in Stage 1's calls (pipeline_stages): the message names the step the run was in
    assert last.ok and last.message.startswith("Stopped during run 2/2") and "step" in last.message
    assert [t.kind for t in last.tiles] == ["layout", "final"] and {t.row[1] for t in last.tiles} == {1}
    assert not engine.busy and engine.stop() is False
    assert final_run(engine).message.startswith("Done")  # the next run is not stopped by the old press


def test_one_generation_at_a_time(engine):
    inner = []

    def try_second_run(step):
        if not inner:
            inner.append(list(run_request(engine, fields()))[-1])

    list(run_request(engine, fields(steps=3), try_second_run))
    assert not inner[0].ok and "another generation is running" in inner[0].message


def test_unexpected_failure_is_one_line(engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine, "generate", broken)
    outcome = list(run_request(engine, fields()))[-1]
    assert outcome.message == "Error: unexpected RuntimeError: out of memory (details in the server's log)"


def test_each_run_has_its_own_folder(engine):
    a, b = final_run(engine, steps=3), final_run(engine, steps=3)
    assert a.tiles[1].path != b.tiles[1].path and a.tiles[1].path.exists()


# --- the serve command
def test_serve_options(tmp_path):
    from layout_retouch.cli import main

    with pytest.raises(SystemExit) as exit_code:
        main(["serve", "--help"])
    assert exit_code.value.code == 0
    assert main(["serve", "--reference", str(tmp_path / "missing.png"), "--threads", "1"]) == 2


def test_serve_refuses_a_busy_port_before_loading(capsys):
    import socket

    from layout_retouch.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port), "--threads", "1"]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", "--port", "70000"]) == 2


def test_serve_reference_and_prompt_options(tmp_path):
    photo = tmp_path / "mine.png"
    Image.open(REFERENCE).save(photo)
    engine = load(serve_args(reference=[str(photo)], prompt="a sks star at night", out=str(tmp_path / "o"),
                             segmenter="none"))
    assert engine.models.references == [photo] and engine.models.example_prompt == "a sks star at night"
    assert engine.models.defaults.segmenter == "none"  # a given method option wins over the toy world's


def test_serve_on_named_models(tiny_dir, tmp_path):
    """--base/--personalized/--token/--class-word/--reference as generate takes them (tiny SD-shaped models)."""
    engine = load(serve_args(base=str(tiny_dir / "base"), personalized=str(tiny_dir / "dreambooth"), token="sks",
                             class_word="dog", reference=[str(tiny_dir / "reference.png")], segmenter="none",
                             out=str(tmp_path / "o"), inversion_cache_dir=str(tmp_path / "cache")))
    models = engine.models
    assert models.references == [tiny_dir / "reference.png"] and models.defaults.segmenter == "none"
    assert models.example_prompt == "a photo of a sks dog on the beach" and "toy world" not in models.title
    outcomes = list(run_request(engine, dict(prompts="a sks dog in the snow", seeds="5", steps=2, method="V",
                                             reference=str(tiny_dir / "reference.png"))))
    assert outcomes[-1].ok, outcomes[-1].message
    p = parameters(outcomes[-1].tiles[-1].path)
    assert p["reference"] == str(tiny_dir / "reference.png") and p["output_key"]["models"]["token"] == "sks"


# --- the page (Gradio)
def test_page_functions():
    pytest.importorskip("gradio", reason="the web extra is not installed")
    from layout_retouch.web.app import number, page_outputs, reference_path
    from layout_retouch.web.engine import Tile

    assert reference_path(None) is None and reference_path({"path": "/x/a.png", "orig_name": "a.png"}) == "/x/a.png"
    assert number("") is None and number("4") == 4.0 and number("soon") == "soon"
    tiles = [Tile(REFERENCE, "c", "final", "V", ("p", 1, 0))]
    gallery, files, status = page_outputs(Outcome(tiles, "Error: x", ok=False))
    assert gallery.columns == 1 and files == [str(REFERENCE)] and "error" in status.elem_classes


def test_page_is_built(engine):
    pytest.importorskip("gradio", reason="the web extra is not installed")
    from layout_retouch.web.app import build_app

    app = build_app(engine)
    ids = {block.elem_id for block in app.blocks.values() if getattr(block, "elem_id", None)}
    assert {"reference", "prompts", "seeds", "method", "steps", "generate", "stop", "status", "gallery",
            "downloads"} <= ids
