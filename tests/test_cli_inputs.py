"""The CLI's reliability: result names that cannot collide, and bad input refused before any work."""

import json
import re

import pytest
from PIL import Image

from layout_retouch.cli import main
from layout_retouch.outputs import OUTPUT_KEY, prompt_folder

LONG = "a photo of a sks dog sitting on a wooden bench in a park with many trees"
# Prompts that the old names (first 60 lower-cased ASCII characters) mapped onto one another.
TWINS = [
    ("a sks dog looking at a star!", "a sks dog looking at a star?"),
    ("a sks dog in the snow", "A sks dog in the snow"),
    (LONG + " in autumn", LONG + " in spring"),
    ("a sks dog under the café sign", "a sks dog under the cafe sign"),
    ("a sks dog 在雪中", "a sks dog 在海边"),
]


def cli(*args):
    return main([str(a) for a in args])


@pytest.mark.parametrize("first, second", TWINS)
def test_prompt_folders_differ_and_stay_readable(first, second):
    assert prompt_folder(first) != prompt_folder(second)
    assert prompt_folder(first) == prompt_folder(first)
    assert "sks-dog" in prompt_folder(first)
    assert prompt_folder(first).isascii() and len(prompt_folder(LONG * 3)) < len(LONG)


def generate_args(tiny_dir, out, *extra):
    return ["generate", "--base", tiny_dir / "base", "--personalized", tiny_dir / "dreambooth", "--token", "sks",
            "--class-word", "dog", "--out", out, "--steps", 1, "--method", "I", "--quiet", "--threads", 1,
            "--height", 32, "--width", 32, *extra]


def results(out):
    return {p: json.loads(p.with_suffix(".json").read_text()) for p in sorted(out.rglob("*.png"))}


def test_generate_keeps_every_prompt(tiny_dir, tmp_path, capsys):
    """Prompts that differ only in punctuation, case, past 60 characters or in non-ASCII text each keep
    their own image, with the exact prompt in its sidecar and PNG chunk."""
    out = tmp_path / "out"
    prompts = [p for pair in TWINS for p in pair]
    assert cli(*generate_args(tiny_dir, out), *[a for p in prompts for a in ("--prompt", p)]) == 0
    found = results(out)
    assert sorted(r["prompt"] for r in found.values()) == sorted(prompts)
    for path, record in found.items():
        assert json.loads(Image.open(path).text["parameters"])["prompt"] == record["prompt"]
    assert "wrote" in capsys.readouterr().out


def test_skip_existing_matches_recorded_parameters(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = generate_args(tiny_dir, out, "--prompt", "a sks dog in the snow")
    assert cli(*args) == 0
    (first,) = results(out)
    before = first.stat().st_mtime_ns
    assert cli(*args, "--skip-existing") == 0
    assert "nothing to do" in capsys.readouterr().out and first.stat().st_mtime_ns == before
    # Other parameters under the same --out are another result, never mistaken for the finished one.
    assert cli(*args, "--skip-existing", "--guidance", 3.0) == 0
    found = results(out)
    assert len(found) == 2 and {r[OUTPUT_KEY]["config"]["guidance_scale"] for r in found.values()} == {3.0, 7.5}
    # A result whose recorded parameters differ from its name's (edited, or from another version) is not
    # taken as done: the run stops with one line instead.
    record = json.loads(first.with_suffix(".json").read_text())
    record[OUTPUT_KEY]["seed"] += 1
    first.with_suffix(".json").write_text(json.dumps(record))
    capsys.readouterr()
    assert cli(*args, "--skip-existing") == 2
    err = capsys.readouterr().err
    assert "other parameters (seed)" in err and len(err.strip().splitlines()) == 1
    assert first.stat().st_mtime_ns == before


def test_evaluate_refuses_images_of_other_parameters(tmp_path, capsys):
    """evaluate files an image by prompt index and seed: rerunning into the same --out with other steps, or
    a prompt file of the same name, must stop with one line, not take the old images for the new run's."""
    from metric_tiny_models import make_concept

    from layout_retouch.errors import LayoutRetouchError
    from layout_retouch.evaluation.concepts import load_concepts
    from layout_retouch.evaluation.jobs import build_jobs

    root = tmp_path / "concepts"
    make_concept(root / "dog1", n_images=1)
    set_a, set_b = tmp_path / "a" / "set.txt", tmp_path / "b" / "set.txt"
    for path, line in ((set_a, "a {} in the snow"), (set_b, "a {} on the beach")):
        path.parent.mkdir()
        path.write_text(line + "\n")
    with pytest.raises(LayoutRetouchError, match="would share the folder 'set'"):
        build_jobs(["I"], load_concepts([root]), [str(set_a), str(set_b)], [0])
    out = tmp_path / "out"
    args = ["evaluate", "--concepts", root, "--out", out, "--methods", "I", "--seeds", 1, "--metrics", "none",
            "--generator", "metric_tiny_models:stand_in_generator", "--no-progress"]
    assert cli(*args, "--prompts", set_a, "--steps", 3) == 0
    (image,) = out.rglob("*.png")
    before = image.stat().st_mtime_ns
    assert cli(*args, "--prompts", set_a, "--steps", 3) == 0  # same run: resumes
    changes = ((["--prompts", set_a, "--steps", 4], "config"), (["--prompts", set_b, "--steps", 3], "prompt"))
    for changed, what in changes:
        capsys.readouterr()
        assert cli(*args, *changed) == 2
        err = capsys.readouterr().err.strip()
        assert f"was made with another {what}" in err and len(err.splitlines()) == 1
    assert image.stat().st_mtime_ns == before


# --- bad input: exit code 2, one line on stderr, no traceback, nothing written, no model loaded


@pytest.fixture
def bad_files(tmp_path):
    """Files a user might pass by mistake, by name."""
    files = {"file": tmp_path / "a_file", "not_image": tmp_path / "not_image.png", "list": tmp_path / "list.json",
             "tau_high": tmp_path / "tau_high.json", "not_json": tmp_path / "not_json.json",
             "unknown_key": tmp_path / "unknown_key.json", "steps_float": tmp_path / "steps_float.json",
             "binary_prompts": tmp_path / "prompts.bin", "sam_uncached": tmp_path / "sam_uncached.json",
             "sam_folder": tmp_path / "sam_folder.json", "target_start": tmp_path / "target_start.json"}
    for name, meta in (("concept_missing_weights", '{"token": "sks", "class_word": "dog", "weights": "gone"}'),
                       ("concept_list", '["sks", "dog"]'), ("concept_number_token", '{"token": 7, "class_word": "d"}')):
        folder = tmp_path / name / "lost"
        folder.mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / "00.png")
        (folder / "concept.json").write_text(meta)
        files[name] = folder
    files["sam_uncached"].write_text('{"sam_model": "nobody/no-such-sam"}')
    files["sam_folder"].write_text(json.dumps({"sam_model": str(tmp_path / "no_sam")}))
    files["file"].write_text("x")
    files["not_image"].write_text("not an image")
    files["list"].write_text("[1, 2]")
    files["tau_high"].write_text('{"tau": "high"}')
    files["not_json"].write_text("{tau: 1")
    files["unknown_key"].write_text('{"tua": 0.2}')
    files["steps_float"].write_text('{"num_inference_steps": 2.5}')
    files["target_start"].write_text('{"target_start": "reference"}')
    files["binary_prompts"].write_bytes(b"\xff\xfe\x00 a sks dog")
    return files


# (extra arguments, what the one line must say); {name} is a file of `bad_files`, {missing} a path that is not.
GENERATE_CASES = [
    (["--num-images", "0"], "--num-images must be 1 or more"),
    (["--num-images", "-3"], "--num-images must be 1 or more"),
    (["--seeds", "-5,-1"], "seed -5 is outside 0..18446744073709551615"),
    (["--seeds", str(2**64)], "is outside 0.."),
    (["--seeds", "4x"], "--seeds must be comma-separated integers"),
    (["--seeds", ","], "--seeds names no seed"),
    (["--steps", "3", "--ref-start-step", "9"], "--ref-start-step (config ref_start_step) must lie in 0..3"),
    (["--steps", "3", "--mask-start-step", "-1"], "--mask-start-step (config mask_start_step) must lie in 0..3"),
    (["--steps", "0"], "num_inference_steps must be at least 1"),
    (["--vanilla-steps", "1.5"], "vanilla_steps as a fraction must lie in [0, 1]"),
    (["--tau", "2"], "tau must lie in [0, 1)"),
    (["--method", "nine"], "unknown method 'nine'"),
    (["--config", "{list}"], "holds a JSON list; it needs an object"),
    (["--config", "{tau_high}"], "'tau' must be a number, got \"high\""),
    (["--config", "{steps_float}"], "'num_inference_steps' must be an integer, got 2.5"),
    (["--config", "{target_start}"], "'target_start' must be one of \"noise\", \"layout\", got \"reference\""),
    (["--config", "{not_json}"], "is not valid JSON"),
    (["--config", "{unknown_key}"], "unknown config keys: tua"),
    (["--config", "{missing}"], "does not exist"),
    (["--device", "cuda"], "--device cuda"),
    (["--device", "toaster"], "--device 'toaster' is not a device"),
    (["--out", "{file}"], "is a file, not a folder"),
    (["--out", "{file}/out"], "cannot be made"),
    (["--prompt", "a dog"], "does not contain the personal token"),
    (["--prompt-file", "{missing}"], "does not exist"),
    (["--prompt-file", "{binary_prompts}"], "is not UTF-8 text"),
    (["--method", "V"], "needs --reference"),
    (["--base", "{missing}"], "does not exist (not a file, folder or hub id)"),
    (["--personalized", "{missing}"], "personalized model"),
    (["--class-word", ""], "a personal token needs the subject's class word"),
    (["--method", "V", "--reference", "{missing}"], "does not exist"),
    (["--method", "V", "--reference", "{not_image}"], "cannot be read as an image"),
]


def _fill(args, files, missing):
    return [a.format(missing=missing, **{k: str(v) for k, v in files.items()}) for a in args]


def assert_refused(code, err, out, expected):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    assert not out.exists() or not any(out.rglob("*")), "something was written"


@pytest.mark.parametrize("extra, expected", GENERATE_CASES, ids=[" ".join(c[0]) for c in GENERATE_CASES])
def test_generate_refuses_bad_input_before_loading_models(tiny_dir, tmp_path, bad_files, monkeypatch, capsys,
                                                          extra, expected):
    import layout_retouch.pipeline

    def no_loading(args):
        raise AssertionError("a model was loaded for an input that can be checked first")

    monkeypatch.setattr(layout_retouch.pipeline, "load_pipeline_from_args", no_loading)
    out = tmp_path / "out"
    args = generate_args(tiny_dir, out, "--prompt", "a sks dog")
    args = [a for a in args if str(a) not in ("--quiet",)]
    if "--method" in extra:  # the case names its own method
        i = args.index("--method")
        del args[i : i + 2]
    if "--steps" in extra:
        i = args.index("--steps")
        del args[i : i + 2]
    if "--prompt" in extra or "--prompt-file" in extra:
        i = args.index("--prompt")
        del args[i : i + 2]
    capsys.readouterr()
    code = cli(*args, *_fill(extra, bad_files, tmp_path / "missing"))
    assert_refused(code, capsys.readouterr().err, out, expected)


def test_generate_refuses_unloadable_models_in_one_line(tiny_dir, tmp_path, capsys):
    """Inputs only a load can check still fail in one line, before any image: the segmenter before Stage 1,
    a pickle (with --allow-pickle) that holds objects other than tensors, without torch's advice to unpickle."""
    import os

    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    evil = tmp_path / "learned_embeds.bin"
    torch.save({"<p>": Payload()}, evil)
    broken = tmp_path / "broken.bin"
    torch.save({"<p>": torch.zeros(1, 32)}, broken)
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])  # a download cut short
    out = tmp_path / "out"
    base = ["generate", "--base", tiny_dir / "base", "--out", out, "--steps", 1, "--quiet", "--threads", 1,
            "--class-word", "dog"]
    pickled = ["--prompt", "a <p> dog", "--token", "<p>", "--method", "I", "--allow-pickle"]
    evil_checkpoint = evil.with_name("model.ckpt")
    evil_checkpoint.write_bytes(evil.read_bytes())
    cases = [
        (["--personalized", evil, *pickled], "this pickle holds objects other than tensors; refusing"),
        (["--base", evil_checkpoint, "--allow-pickle", "--prompt", "a dog", "--method", "I"],  # the last --base
         "model.ckpt: this pickle holds objects other than tensors; refusing"),
        (["--personalized", broken, *pickled, "--personalization", "textual_inversion"],
         "cannot be read as a torch pickle"),
        (["--personalized", tiny_dir / "dreambooth", "--token", "sks", "--prompt", "a sks dog", "--method", "V",
          "--reference", tiny_dir / "reference.png", "--sam-model", tmp_path / "no_sam"],
         "pass --segmenter none (cross-attention masks only) or --sam-model FOLDER"),
    ]
    for extra, expected in cases:
        capsys.readouterr()
        code = cli(*base, *extra)
        err = capsys.readouterr().err
        assert_refused(code, err, out, expected)
        assert "weights_only=False" not in err


EVALUATE_CASES = [
    (["--batch-size", "0"], "--batch-size must be 1 or more"),
    (["--limit", "0"], "--limit must be 1 or more"),
    (["--seeds", "0"], "--seeds as a count must lie in 1.."),
    (["--seeds", "-5,-1"], "seed -5 is outside"),
    (["--seeds", "1,x"], "--seeds must be comma-separated integers"),
    (["--device", "toaster"], "is not a device"),
    (["--out", "{file}"], "is a file, not a folder"),
    (["--config", "{list}"], "holds a JSON list"),
    (["--config", "{tau_high}"], "'tau' must be a number"),
    (["--config", "{not_json}"], "is not valid JSON"),
    (["--methods", "VI"], "unknown method 'VI'"),
    (["--base", "{file}", "--methods", "I,V", "--config", "{sam_uncached}"],
     "not in the local cache and the hub is off (HF_HUB_OFFLINE): pass --segmenter none"),
    (["--base", "{file}", "--methods", "V", "--config", "{sam_folder}"], "is not a model folder: pass --segmenter"),
    (["--base", "{missing}"], "--base '"),
    (["--base", "{file}", "--concepts", "{concept_missing_weights}"], "concept lost: its weights"),
    (["--concepts", "{concept_list}"], "holds a JSON list; it needs an object"),
    (["--concepts", "{concept_number_token}"], "'token' must be a string, got 7"),
]


@pytest.mark.parametrize("extra, expected", EVALUATE_CASES, ids=[" ".join(c[0]) for c in EVALUATE_CASES])
def test_evaluate_refuses_bad_input(tmp_path, bad_files, capsys, extra, expected):
    from metric_tiny_models import make_concept

    root = tmp_path / "concepts"
    make_concept(root / "dog1", n_images=1)
    out = tmp_path / "out"
    args = ["evaluate", "--concepts", root, "--out", out, "--seeds", 1, "--metrics", "none", "--no-progress",
            "--generator", "metric_tiny_models:stand_in_generator", "--threads", 1]
    replaced = {"--seeds", "--out", "--concepts"} & set(extra) | ({"--generator"} if "--base" in extra else set())
    for flag in replaced:  # the case gives its own
        i = args.index(flag)
        del args[i : i + 2]
    code = cli(*args, *_fill(extra, bad_files, tmp_path / "missing"))
    assert_refused(code, capsys.readouterr().err, out, expected)


def test_ctrl_c_says_what_was_written_and_the_rerun_finishes(tiny_dir, tmp_path, monkeypatch, capsys):
    import layout_retouch.cli.generate as generate

    real_save, saved = generate.save_result, []

    def save_then_interrupt(*args, **kwargs):
        real_save(*args, **kwargs)
        saved.append(args[1])
        raise KeyboardInterrupt

    out = tmp_path / "out"
    args = generate_args(tiny_dir, out, "--prompt", "a sks dog in the snow", "--prompt", "a sks dog on the beach")
    monkeypatch.setattr(generate, "save_result", save_then_interrupt)
    assert cli(*args) == 130
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"layout-retouch generate: interrupted; {len(saved)} results written, rerun with "
                                "--skip-existing"]
    monkeypatch.setattr(generate, "save_result", real_save)
    assert cli(*args, "--skip-existing") == 0
    found = results(out)
    assert len(found) == 2 and saved[0] in found


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "P", "CMYK", "RGBA", "LA", "L", "1"])
def test_reference_of_any_mode_keeps_its_tones(tmp_path, mode):
    """A grey ramp saved in each mode reads back as the same ramp in RGB (Pillow's plain convert makes a
    16-bit ramp all white); a transparent part becomes white, not black."""
    import numpy as np

    from layout_retouch.inversion import to_rgb

    ramp = np.tile(np.linspace(0, 255, 64).round().astype(np.uint8), (16, 1))
    grey = Image.fromarray(ramp, "L")
    scaled = {"I;16": ramp.astype(np.uint16) * 257, "I": ramp.astype(np.int32) * 257, "F": ramp / 255.0}
    if mode in scaled:
        image = Image.fromarray(scaled[mode].astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
        image = image if image.mode == mode else image.convert(mode)
    else:
        image = grey.convert(mode)
    if mode in ("RGBA", "LA"):
        alpha = Image.fromarray(np.where(np.arange(16)[:, None] < 8, 255, 0).repeat(64, 1).astype(np.uint8))
        image.putalpha(alpha)
    path = tmp_path / ("ref.tiff" if mode in ("F", "I", "CMYK") else "ref.png")
    image.save(path)
    with Image.open(path) as opened:
        assert opened.mode == mode or mode == "I;16"
        rgb = np.asarray(to_rgb(opened), dtype=int)
    assert rgb.shape == (16, 64, 3)
    expected = np.asarray(grey.convert("1").convert("L") if mode == "1" else grey, dtype=int)
    top = rgb[:8] if mode in ("RGBA", "LA") else rgb
    assert np.abs(top - expected[: len(top), :, None]).max() <= (1 if mode != "CMYK" else 2)
    if mode in ("RGBA", "LA"):
        assert (rgb[8:] == 255).all()  # transparent: white


def test_small_reference_warns(tmp_path):
    from layout_retouch.inversion import load_reference_image

    Image.new("RGB", (16, 12), "gray").save(tmp_path / "small.png")
    with pytest.warns(UserWarning, match="smaller than the model's 32x32"):
        assert load_reference_image(tmp_path / "small.png", (32, 32)).size == (32, 32)


def test_prompt_past_the_token_limit(tiny_dir, tmp_path, capsys):
    filler = " ".join(["red"] * 80)
    out = tmp_path / "out"
    assert cli(*generate_args(tiny_dir, out, "--prompt", f"a sks dog with {filler}")) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the rest is dropped" in err[0] and "warning" in err[0]
    assert cli(*generate_args(tiny_dir, tmp_path / "cut", "--prompt", f"a {filler} sks dog")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "personal token 'sks' lies beyond" in err[0]
    assert not (tmp_path / "cut").exists()


def test_help_is_fast_and_says_each_default_once():
    """`--help` imports no torch (seconds on a busy machine) and ArgumentDefaultsHelpFormatter's
    "(default: ...)" appears only where the help does not already give the default."""
    import subprocess
    import sys

    code = ("import sys\nfrom layout_retouch.cli import main\n"
            "for argv in ([], ['generate'], ['demo'], ['evaluate'], ['personalize']):\n"
            "    try:\n        main([*argv, '--help'])\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, 'diffusers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False False"
    from layout_retouch.cli import build_parser

    parser = build_parser("generate")
    generate = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "generate")[1]
    text = generate.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    flat = " ".join(text.split())
    assert "(default: detected)" in flat and not re.search(r"\(default[^)]*\) \(default", flat)
    assert "(default: 42)" in text  # a default the help does not give is still shown


def test_demo_grid_labels_keep_their_spaces():
    """The word gaps of a label are wider than any gap between letters (at Pillow's default 10 px font
    they were not: a space is 2 px and the words run together)."""
    import numpy as np

    from layout_retouch.cli.demo import grid

    prompt = "a photo of a sks star at night"
    label = 18
    canvas = grid([(prompt, [])], label=label)
    band = np.asarray(canvas.convert("L"))[label : 2 * label] < 128  # the row's label, under the column titles
    ink = band.any(axis=0)
    cols = np.flatnonzero(ink)
    runs, run = [], 0
    for inked in ink[cols[0] : cols[-1] + 1]:
        if inked:
            runs, run = (runs + [run]) if run else runs, 0
        else:
            run += 1
    runs.sort(reverse=True)
    spaces = prompt.count(" ")
    assert len(runs) > spaces and runs[spaces - 1] > runs[spaces]


def test_personalization_kinds_agree():
    from layout_retouch.cli.options import KINDS
    from layout_retouch.models import KINDS as MODEL_KINDS

    assert KINDS == MODEL_KINDS


def test_no_torchvision_notice_from_transformers():
    """transformers 5 announces its PIL fallback for every image processor when torchvision is missing."""
    import subprocess
    import sys

    code = "import layout_retouch.pipeline\nfrom transformers import CLIPImageProcessor\nCLIPImageProcessor()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "torchvision" not in done.stderr


def test_size_off_the_vae_grid_warns(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(*generate_args(tiny_dir, out, "--prompt", "a sks dog"), "--height", 33) == 0  # odd: off any VAE grid
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--height 33 is not a multiple of" in err[0]
    (image,) = results(out)
    assert Image.open(image).height < 33


PARSER_CASES = [
    (["generate", "--base", "b", "--out", "o", "--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    (["generate", "--base", "b", "--out", "o", "--threads", "-1"], "argument --threads: must be 0"),
    (["generate", "--base", "b"], "the following arguments are required: --out"),
    (["evaluate", "--out", "o"], "the following arguments are required: --concepts"),
    (["demo", "--seeds", "many"], "argument --seeds: invalid int value"),
    (["nonsense"], "invalid choice: 'nonsense'"),
]


@pytest.mark.parametrize("argv, expected", PARSER_CASES, ids=[" ".join(c[0]) for c in PARSER_CASES])
def test_option_errors_are_one_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_code:
        main(argv)
    assert exit_code.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "usage" not in err[0]


@pytest.mark.parametrize("extra, expected", [(["--seeds", "0"], "--seeds and --steps must be 1 or more"),
                                             (["--steps", "-2"], "--seeds and --steps must be 1 or more"),
                                             (["--out", "{file}"], "is a file, not a folder")])
def test_demo_refuses_bad_input(tmp_path, bad_files, capsys, extra, expected):
    out = tmp_path / "demo"
    code = cli("demo", "--out", out, "--threads", 1, "--quiet", *_fill(extra, bad_files, tmp_path / "missing"))
    assert_refused(code, capsys.readouterr().err, out, expected)


def test_ctrl_c_in_evaluate_says_how_to_resume(tmp_path, monkeypatch, capsys):
    from metric_tiny_models import make_concept

    (tmp_path / "interrupting.py").write_text("def generate(request):\n    raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    make_concept(tmp_path / "concepts" / "dog1", n_images=1)
    code = cli("evaluate", "--concepts", tmp_path / "concepts", "--out", tmp_path / "out", "--methods", "I",
               "--seeds", 1, "--metrics", "none", "--no-progress", "--generator", "interrupting:generate",
               "--threads", 1)
    assert code == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "layout-retouch evaluate: interrupted; rerun the same command to resume"]


def test_a_full_disk_is_one_line(tiny_dir, tmp_path, monkeypatch, capsys):
    """An error of the system, not the input, while writing: one line, exit 1, no half-written result."""
    import errno

    import layout_retouch.outputs

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(layout_retouch.outputs.Image.Image, "save", disk_full)
    out = tmp_path / "out"
    assert cli(*generate_args(tiny_dir, out, "--prompt", "a sks dog")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0]
    assert not list(out.rglob("*.png")) and not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("given, expected", [([], None), (["--threads", "1"], 1), (["--threads", "0"], 0)])
def test_generate_and_evaluate_take_threads(tiny_dir, tmp_path, monkeypatch, given, expected):
    """Both apply --threads (None: the idle cores, as demo and toy-bench) before any model loads."""
    from metric_tiny_models import make_concept

    import layout_retouch.cli.evaluate as evaluate
    import layout_retouch.cli.generate as generate
    import layout_retouch.pipeline
    from layout_retouch.errors import LayoutRetouchError

    applied = []

    def record(threads):
        applied.append(threads)
        raise LayoutRetouchError("stop here")

    monkeypatch.setattr(generate, "set_threads", record)
    monkeypatch.setattr(evaluate, "set_threads", record)
    monkeypatch.setattr(layout_retouch.pipeline, "load_pipeline_from_args", lambda args: pytest.fail("loaded"))
    args = generate_args(tiny_dir, tmp_path / "g", "--prompt", "a sks dog")
    del args[args.index("--threads") : args.index("--threads") + 2]
    assert cli(*args, *given) == 2
    make_concept(tmp_path / "concepts" / "dog1", n_images=1)
    assert cli("evaluate", "--concepts", tmp_path / "concepts", "--out", tmp_path / "e", "--metrics", "none",
               "--generator", "metric_tiny_models:stand_in_generator", *given) == 2
    assert applied == [expected, expected]
