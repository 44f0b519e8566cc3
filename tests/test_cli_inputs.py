"""The CLI's reliability: result names that cannot collide, and bad input refused before any work."""

import json

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
