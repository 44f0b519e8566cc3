"""The evaluation runner: outputs, resume after a crash, two processes, seed batches, CLI errors."""

import csv
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from metric_tiny_models import build_tiny_metric_models, make_concept, metric_cli_args, stand_in_generator
from PIL import Image

from layout_retouch.cli import main
from layout_retouch.evaluation.concepts import load_concepts
from layout_retouch.evaluation.jobs import build_jobs, seed_batches
from layout_retouch.evaluation.runner import RunOptions, run_evaluation
from layout_retouch.evaluation.scoring import MetricSettings

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_tiny_metric_models(tmp_path_factory.mktemp("metric_models"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("concepts")
    make_concept(root / "dog1", n_images=2)
    prompts = root / "prompts.txt"
    prompts.write_text("a {} in the snow\na {} on the beach\n")
    return root, prompts


def _settings(models):
    return MetricSettings(
        clip_model=models["clip"], dino_model=models["dino"], pickscore_model=models["clip"],
        pickscore_processor=models["clip"], detector_model=models["owl"], is_backend="transformers",
        is_classifier=models["classifier"], device="cpu",
    )


def _jobs(dataset):
    root, prompts = dataset
    return build_jobs(["I", "V"], load_concepts([root]), [str(prompts)], [0, 1])  # 8 images


class Counting:
    """Stand-in generator that counts its calls and can crash after `crash_after` images."""

    def __init__(self, crash_after=None):
        self.calls = Counter()
        self.crash_after = crash_after

    def __call__(self, request):
        if self.crash_after is not None and sum(self.calls.values()) == self.crash_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls[(request.method, request.prompt, request.seed)] += 1
        return stand_in_generator(request)


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?")


def _same_up_to_rounding(a: str, b: str) -> bool:
    """The same text, numbers equal to float rounding: processes with another thread count round differently."""
    if NUMBER.split(a) != NUMBER.split(b):
        return False
    return np.allclose([float(x) for x in NUMBER.findall(a)], [float(x) for x in NUMBER.findall(b)],
                       rtol=1e-4, atol=1e-3)


def _cli_args(dataset, models, out):
    root, prompts = dataset
    return ["evaluate", "--concepts", str(root), "--out", str(out), "--methods", "I,V", "--prompts",
            str(prompts), "--seeds", "2", "--generator", "metric_tiny_models:stand_in_generator",
            "--no-progress", *metric_cli_args(models)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models on a shared 2-core machine: threads only fight each other
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, models, dataset):
    """One plain, uninterrupted CLI run: the result every other way of running must match."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main(_cli_args(dataset, models, out)) == 0
    return out


def test_run_writes_tables_and_plots_consistent_with_per_image_scores(uninterrupted):
    rows = _read_csv(uninterrupted / "results.csv")
    assert len(rows) == 8
    for name in ("table.md", "results_by_prompt.csv", "results_by_method.csv", "plots/centers_prompts.png",
                 "plots/metrics_prompts.png"):
        assert (uninterrupted / name).is_file(), name
    table = (uninterrupted / "table.md").read_text()
    assert "not Inception-v3" in table and "V: + adaptive mask blending" in table
    # method V's CLIP-I = mean over prompts of the mean over that prompt's images
    v = [r for r in rows if r["method"] == "V"]
    per_prompt = [np.mean([float(r["clip_i"]) for r in v if r["prompt_index"] == p]) for p in ("0", "1")]
    (row_v,) = [r for r in _read_csv(uninterrupted / "results_by_method.csv") if r["method"] == "V"]
    assert float(row_v["clip_i"]) == pytest.approx(np.mean(per_prompt))
    assert f"{float(row_v['clip_i']):.3f}" in table
    assert all(-1 <= float(r["clip_t"]) <= 1 and 0 <= float(r["center_x"]) <= 1 for r in rows)
    assert float(row_v["inception_score"]) >= 1.0


def test_resume_after_crash_generates_each_image_once_and_gives_the_same_table(tmp_path, models, dataset,
                                                                               uninterrupted):
    jobs = _jobs(dataset)
    resumed = tmp_path / "resumed"
    first = Counting(crash_after=3)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(jobs, first, RunOptions(resumed, metrics=_settings(models), progress=False))
    assert len(list(resumed.rglob("*.png"))) == 3
    (resumed / "images" / "stale.png.partial123").write_bytes(b"half an image")  # a killed write
    second = Counting()
    result = run_evaluation(jobs, second, RunOptions(resumed, metrics=_settings(models), progress=False))
    assert result.generated == 5
    total = first.calls + second.calls
    assert len(total) == 8 and set(total.values()) == {1}
    assert not list(resumed.rglob("*.partial*"))
    assert (resumed / "table.md").read_text() == (uninterrupted / "table.md").read_text()
    assert _read_csv(resumed / "results.csv") == _read_csv(uninterrupted / "results.csv")

    # a third run has nothing left to do
    third = Counting()
    again = run_evaluation(jobs, third, RunOptions(resumed, metrics=_settings(models), progress=False))
    assert (again.generated, again.scored, sum(third.calls.values())) == (0, 0, 0)


def test_two_processes_give_the_same_results_as_one(tmp_path, models, dataset, uninterrupted):
    two = tmp_path / "two"
    log = tmp_path / "ranks.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "EVAL_TEST_LOG": str(log), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # torchrun with gloo on the CPU (accelerate's own launcher runs one process without a GPU)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "layout_retouch.cli",
           *_cli_args(dataset, models, two)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = Counter(line.split()[0] for line in log.read_text().splitlines())
    assert ranks == {"0": 4, "1": 4}  # the 8 images were split, none made twice
    # one torch thread each against the in-process run's own: the same rows, numbers to float rounding
    assert _same_up_to_rounding((two / "results.csv").read_text(), (uninterrupted / "results.csv").read_text())
    assert _same_up_to_rounding((two / "table.md").read_text(), (uninterrupted / "table.md").read_text())


def test_cli_bad_inputs_give_clear_errors(tmp_path, models, dataset, capsys):
    root, prompts = dataset
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "concept.json").write_text('{"token": "sks", "class_word": "dog"}')
    base = ["--out", str(tmp_path / "o"), "--generator", "metric_tiny_models:stand_in_generator"]
    assert main(["evaluate", "--concepts", str(empty), *base]) == 2
    assert "has no images" in capsys.readouterr().err
    assert main(["evaluate", "--concepts", str(root), "--prompts", "nonsense", *base]) == 2
    assert "unknown prompt set 'nonsense'" in capsys.readouterr().err
    args = _cli_args(dataset, models, tmp_path / "o")
    args[args.index("--dino-model") + 1] = str(tmp_path / "no_dino")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "DINO model" in err and "--dino-model" in err
    assert not (tmp_path / "o" / "images").exists()  # failed before generating anything
    assert main(["evaluate", "--concepts", str(root), "--batch-size", "0", *base]) == 2
    assert "--batch-size must be 1 or more" in capsys.readouterr().err
    args = _cli_args(dataset, models, tmp_path / "o2") + ["--preference", "imagereward"]
    assert main(args) == 2
    assert "ImageReward is unavailable" in capsys.readouterr().err


class Batching(Counting):
    """A stand-in that takes batches of seeds (as PipelineGenerator does) and records their sizes."""

    def __init__(self, crash_after_batches=None):
        super().__init__()
        self.sizes, self.crash_after_batches = [], crash_after_batches

    def generate_batch(self, requests):
        if self.crash_after_batches is not None and len(self.sizes) == self.crash_after_batches:
            raise KeyboardInterrupt("simulated kill")
        self.sizes.append(len(requests))
        return [Counting.__call__(self, r) for r in requests]


def test_seed_batches_hold_the_seeds_of_one_method_and_prompt(dataset):
    jobs = _jobs(dataset)
    assert seed_batches(jobs, 1) == [[job] for job in jobs]  # one per call, in the jobs' own order
    batches = seed_batches(jobs, 2)
    assert sorted(len(b) for b in batches) == [2, 2, 2, 2]
    assert Counter(j for b in batches for j in b) == Counter(jobs)
    for batch in batches:
        assert len({(j.method, j.prompt_index) for j in batch}) == 1 and len({j.seed for j in batch}) == 2
    assert [len(b) for b in seed_batches(jobs, 3)] == [2, 2, 2, 2]  # two seeds per prompt here


def test_batched_generation_writes_every_image_once_and_resumes(tmp_path, dataset):
    jobs = _jobs(dataset)
    out = tmp_path / "batched"
    first = Batching(crash_after_batches=1)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(jobs, first, RunOptions(out, metrics=None, progress=False, batch_size=2))
    assert first.sizes == [2] and len(list(out.rglob("*.png"))) == 2  # the finished batch is kept
    second = Batching()
    result = run_evaluation(jobs, second, RunOptions(out, metrics=None, progress=False, batch_size=2))
    assert result.generated == 6 and second.sizes == [2, 2, 2]
    total = first.calls + second.calls
    assert len(total) == 8 and set(total.values()) == {1}
    info = json.loads(Image.open(jobs[0].image_path(out)).text["layout_retouch"])
    assert info["seed"] == jobs[0].seed and sorted(info["seeds_in_call"]) == [0, 1]  # saved with the image
    # a generator without generate_batch makes one image per call whatever the batch size
    single = Counting()
    assert run_evaluation(jobs, single, RunOptions(tmp_path / "single", metrics=None, progress=False,
                                                   batch_size=4)).generated == 8
