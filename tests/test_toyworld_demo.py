"""The shipped toy world end to end: its personalizations through the project's loader, and `demo`."""

import json

import numpy as np
import pytest
import torch

from layout_retouch.cli import main, options
from layout_retouch.cli.demo import TOY_MODELS
from layout_retouch.config import LayoutRetouchConfig
from layout_retouch.pipeline import LayoutRetouchPipeline

SHIPPED = [("sks_star_dreambooth", "dreambooth", "sks"), ("sks_star_lora", "lora", "sks"),
           ("sks_star_ti", "textual_inversion", "<sks>")]


@pytest.mark.parametrize(("folder", "kind", "token"), SHIPPED)
def test_shipped_personalization_loads_and_changes_the_output(folder, kind, token):
    pipe = LayoutRetouchPipeline.from_pretrained(str(TOY_MODELS / "vanilla"), personalized=str(TOY_MODELS / folder),
                                                 token=token, class_word="star", progress=False)
    assert pipe.models.kind == kind

    def sample(vanilla_steps):
        config = LayoutRetouchConfig(method="II", num_inference_steps=4, vanilla_steps=vanilla_steps)
        return pipe(f"a photo of a {token} star on the beach", config=config, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    personalized, base = sample(0), sample(1.0)  # T_l = T: the vanilla model all the way
    assert personalized.shape == (1, 64, 64, 3)
    assert np.abs(personalized - base).mean() > 1e-3


def test_demo_writes_grid_summary_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "4", "--seeds", "1", "--threads", "0", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["measures"]) == {"I", "II", "V"}
    assert summary["config"]["method"] == "V" and summary["seeds_per_prompt"] == 1
    for method in ("I", "II", "V"):
        assert len(list((out / method).glob("*.png"))) == len(summary["prompts"])
        assert 0 <= summary["measures"][method]["identity"] <= 1
    assert (out / "grid.png").stat().st_size > 0
    assert main(["demo", "--out", str(out), "--steps", "4", "--seeds", "1", "--threads", "0", "--quiet"]) != 0
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(("load", "cores", "expected"), [(0.1, 2, 2), (1.2, 2, 1), (5.0, 2, 1), (2.4, 8, 6)])
def test_default_threads_leave_busy_cores_alone(monkeypatch, load, cores, expected):
    monkeypatch.setattr(options.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(options.os, "cpu_count", lambda: cores)
    before = torch.get_num_threads()
    try:
        assert options.set_threads(None) == expected
        assert torch.get_num_threads() == expected
        assert options.set_threads(3) == 3
    finally:
        torch.set_num_threads(before)
