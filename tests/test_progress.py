"""The pipeline's step progress: a callback sees both stages' steps, and an exception it raises ends the run."""

import numpy as np
import pytest
import torch

from layout_retouch.cli.demo import CLASS_WORD, TOKEN, TOY_METHOD, find_toy_models
from layout_retouch.config import LayoutRetouchConfig
from layout_retouch.pipeline import LayoutRetouchPipeline
from layout_retouch.progress import track

PROMPT = "a photo of a sks star in the snow"


@pytest.fixture(scope="module")
def toy_pipe():
    torch.set_num_threads(1)
    base, tuned, reference = find_toy_models("sks_star_dreambooth")
    pipe = LayoutRetouchPipeline.from_pretrained(str(base), personalized=str(tuned), token=TOKEN,
                                                 class_word=CLASS_WORD, progress=False)
    return pipe, reference


def test_track_bool_passes_steps_through():
    assert list(track(range(3), "x", False)) == [0, 1, 2]
    assert list(track(range(3), "x", True)) == [0, 1, 2]


def test_track_callback_before_first_and_after_each_step():
    calls, seen = [], []
    for step in track(range(3), "stage", lambda *a: calls.append(a)):
        seen.append((step, len(calls)))
    assert calls == [("stage", 0, 3), ("stage", 1, 3), ("stage", 2, 3), ("stage", 3, 3)]
    assert seen == [(0, 1), (1, 2), (2, 3)]  # the step runs after the report of the steps before it


def test_callback_follows_both_stages(toy_pipe, tmp_path):
    pipe, reference = toy_pipe
    config = LayoutRetouchConfig(num_inference_steps=6, vanilla_steps=2, inversion_cache_dir=str(tmp_path),
                                 **TOY_METHOD)
    calls = []
    pipe.progress = lambda stage, done, total: calls.append((stage, done, total))
    try:
        pipe(PROMPT, reference_image=reference, config=config, generator=torch.Generator().manual_seed(0))
    finally:
        pipe.progress = False
    stages = list(dict.fromkeys(stage for stage, _, _ in calls))
    assert stages[0] == "stage 1 layout" and stages[-1] == "stage 2 retouch"
    for stage in ("stage 1 layout", "stage 2 retouch"):
        assert [d for s, d, _ in calls if s == stage] == list(range(7))
        assert {t for s, _, t in calls if s == stage} == {6}
    assert set(stages) <= {"stage 1 layout", "invert reference", "stage 2 retouch"}


class Stop(Exception):
    pass


def test_exception_from_callback_ends_run_and_pipeline_still_works(toy_pipe, tmp_path):
    pipe, reference = toy_pipe
    config = LayoutRetouchConfig(num_inference_steps=6, inversion_cache_dir=str(tmp_path), **TOY_METHOD)
    processors = dict(pipe.models.pipe.unet.attn_processors)
    calls = []

    def stop_in_stage2(stage, done, total):
        calls.append((stage, done))
        if stage == "stage 2 retouch" and done == 3:
            raise Stop

    pipe.progress = stop_in_stage2
    try:
        with pytest.raises(Stop):
            pipe(PROMPT, reference_image=reference, config=config, generator=torch.Generator().manual_seed(1))
    finally:
        pipe.progress = False
    assert calls[-1] == ("stage 2 retouch", 3)
    assert dict(pipe.models.pipe.unet.attn_processors) == processors  # the method's processors were removed
    again = pipe(PROMPT, reference_image=reference, config=config, generator=torch.Generator().manual_seed(1))
    fresh = LayoutRetouchPipeline(pipe.models, progress=False)
    expected = fresh(PROMPT, reference_image=reference, config=config, generator=torch.Generator().manual_seed(1))
    # Equal up to float rounding: where the reference's inversion is cached, its rows no longer ride in Stage 1's
    # UNet calls, and the rows a call carries can change the others' rounding (a pixel level at most here).
    difference = np.abs(np.asarray(again.images[0], np.int16) - np.asarray(expected.images[0], np.int16))
    assert difference.max() <= 1
