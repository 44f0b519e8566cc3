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
    # the world's settings by default (toyworld/world.py), the paper's on request
    assert summary["settings"] == "world" and summary["config"]["target_start"] == "layout"
    assert summary["config"]["vanilla_steps"] == 0.4
    for method in ("I", "II", "V"):
        assert len(list((out / method).glob("*.png"))) == len(summary["prompts"])
        assert 0 <= summary["measures"][method]["identity"] <= 1
    assert (out / "grid.png").stat().st_size > 0
    assert main(["demo", "--out", str(out), "--steps", "4", "--seeds", "1", "--threads", "0", "--quiet"]) != 0
    assert "--overwrite" in capsys.readouterr().err
    paper = tmp_path / "paper"
    assert main(["demo", "--out", str(paper), "--steps", "4", "--seeds", "1", "--threads", "0", "--quiet",
                 "--settings", "paper"]) == 0
    summary = json.loads((paper / "summary.json").read_text())
    assert summary["config"]["target_start"] == "noise" and summary["config"]["vanilla_steps"] == 0.1


def test_default_threads_are_the_idle_cores(monkeypatch, tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3 4\n")
    later = "cpu  150 0 150 900 0 0 0 0 0 0\ncpu0 1 2 3 4\n"  # of 200 ticks since, 100 idle: half the cores
    monkeypatch.setattr(options.time, "sleep", lambda _: stat.write_text(later))
    monkeypatch.setattr(options.os, "cpu_count", lambda: 4)
    assert options.idle_cores(stat=stat) == 2
    assert options.idle_cores(stat=tmp_path / "absent") == 4

    monkeypatch.setattr(options, "idle_cores", lambda: 2)
    before = torch.get_num_threads()
    try:
        assert options.set_threads(None) == 2 and torch.get_num_threads() == 2
        assert options.set_threads(3) == 3 and torch.get_num_threads() == 3
        assert options.set_threads(0) == 0 and torch.get_num_threads() == 3  # 0: left as it is
    finally:
        torch.set_num_threads(before)
