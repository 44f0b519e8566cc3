"""`toy-bench` end to end: --quick on the shipped toy models, and resuming / row reuse on tiny models."""

import json
import os

import numpy as np
import pytest

from layout_retouch.cli import main
from layout_retouch.toyworld import bench
from layout_retouch.toyworld.bench import BenchSettings, generate, run_bench
from layout_retouch.toyworld.bench_prompts import BenchPrompt
from layout_retouch.toyworld.datasets import reference_sample
from layout_retouch.toyworld.render import render
from layout_retouch.toyworld.scene import SceneSpec

ROWS = ["I", "II", "III", "IV", "V"]


def test_quick_run_writes_well_formed_results(tmp_path):
    out = tmp_path / "bench"
    assert main(["toy-bench", "--quick", "--quiet", "--threads", "0", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["personalizations"]["found"]) == {"dreambooth"}
    rows = results["results"]["dreambooth"]
    assert list(rows) == ROWS
    for summary in rows.values():
        assert set(summary) == {"all", "normal", "challenging"}
        assert summary["all"]["n_images"] == 4 and summary["normal"]["n_images"] == 2
        for key in ("identity", "prompt_fidelity", "diversity"):
            m = summary["all"][key]
            assert m["ci_low"] <= m["mean"] + 1e-3 <= m["ci_high"] + 2e-3
        assert 0 <= summary["all"]["identity"]["mean"] <= 1 and 0 <= summary["all"]["prompt_fidelity"]["mean"] <= 1
    table = (out / "table.md").read_text()
    assert all(f"| {row} |" in table for row in ROWS)
    assert (out / "scatter_dreambooth.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "grids").iterdir()) == [f"dreambooth_{r}.png" for r in ROWS]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """The toy models' folder layout, filled with tiny random models (fast; their pictures are noise)."""
    from tiny_world import make_base, make_dreambooth

    root = tmp_path_factory.mktemp("toy_models")
    make_base(root / "vanilla")
    make_dreambooth(root / "sks_star_dreambooth")
    (root / "references").mkdir()
    reference_sample(0).pil().save(root / "references" / bench.REFERENCE_NAME)
    return root


def tiny_settings(models, out, methods=("I", "II", "V")):
    return BenchSettings(out=out, prompts=[BenchPrompt("a photo of a {} on the beach")], seeds=(0, 1), steps=4,
                         personalizations=("dreambooth", "lora"), methods=methods, models_dir=models,
                         overrides={"ref_start_step": 1})


def test_resume_skips_finished_units_and_reports_missing(tiny_models, tmp_path, monkeypatch):
    os.environ["HF_HUB_OFFLINE"] = "1"
    settings = tiny_settings(tiny_models, tmp_path)
    first = run_bench(settings, log=lambda _: None)
    assert list(first["personalizations"]["missing"]) == ["lora"]
    assert list(first["results"]["dreambooth"]) == ["I", "II", "V"]

    def no_generation(*args, **kwargs):
        raise AssertionError("a finished unit was generated again")

    monkeypatch.setattr(bench, "generate", no_generation)
    second = run_bench(settings, log=lambda _: None)
    assert second["results"] == first["results"]
    # Other seeds make the units stale: they are generated again, not mixed with the old ones.
    with pytest.raises(AssertionError, match="generated again"):
        run_bench(BenchSettings(**{**vars(settings), "seeds": (0, 1, 2)}), log=lambda _: None)


def test_row_two_from_full_method_equals_its_own_call(tiny_models, tmp_path):
    settings = tiny_settings(tiny_models, tmp_path)
    personalization = bench.find_personalizations(tiny_models, ("dreambooth",))[0][0]
    pipe = bench.PipelineCache(settings).get(personalization)
    text = settings.prompts[0].text(personalization.subject)
    full = generate(pipe, "V", text, settings.seeds, settings.config("V"), settings.reference)
    alone = generate(pipe, "II", text, settings.seeds, settings.config("II"), settings.reference)
    for a, b in zip(full["II"], alone["II"], strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(full["V"][0]), np.asarray(full["II"][0]))
    # batching seeds gives each seed its own image, as one call per seed does: to one level of 255, since
    # torch's CPU kernels may round a batch of one differently from a batch of three (seen on an AMD EPYC);
    # another seed's image would differ everywhere
    single = generate(pipe, "II", text, (1,), settings.config("II"), settings.reference)
    diff = np.abs(np.asarray(single["II"][0]).astype(int) - np.asarray(alone["II"][1]).astype(int))
    assert diff.max() <= 1
    assert not np.array_equal(np.asarray(alone["II"][0]), np.asarray(alone["II"][1]))


def test_sweep_writes_table_and_plot_with_each_point_once(tiny_models, tmp_path, monkeypatch):
    """The sweep's bookkeeping, with generation replaced by renders (the pipeline itself is tested above)."""
    made = []

    def fake_generate(pipe, method, text, seeds, config, reference):
        made.append((config.num_vanilla_steps, config.ref_start_step, config.mask_start))
        return {method: [render(SceneSpec(obj="star", pattern="personal", scene="beach"), seed=s).pil() for s in seeds]}

    monkeypatch.setattr(bench, "generate", fake_generate)
    monkeypatch.setattr(bench.PipelineCache, "get", lambda self, p: None)
    settings = BenchSettings(out=tmp_path, prompts=[BenchPrompt("a photo of a {} on the beach")], seeds=(0, 1, 2),
                             steps=50, personalizations=("dreambooth",), models_dir=tiny_models)
    sweep = bench.run_sweep(settings, log=lambda _: None)
    assert len(made) == len(set(made)) == len(sweep["points"]) == 11
    assert (5, 4, 4) in made and (0, 4, 4) in made and (5, 10, 10) in made and (5, 4, 30) in made
    table = (tmp_path / "sweep.md").read_text()
    assert table.count("\n| ") == 12  # header and one row per point
    assert (tmp_path / "sweep.png").stat().st_size > 0
    for point in sweep["points"].values():
        assert point["summary"]["all"]["prompt_fidelity"]["mean"] == 1.0  # a beach render follows "on the beach"
