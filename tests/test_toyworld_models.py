"""The shipped vanilla toy model is a standard diffusers SD folder: it loads and generates."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from layout_retouch.toyworld.scene import PERSONAL_TOKEN

VANILLA = Path(__file__).resolve().parents[1] / "layout_retouch" / "toyworld" / "models" / "vanilla"
MAX_VANILLA_MB = 20


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(VANILLA)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folder_is_a_standard_sd_pipeline():
    index = json.loads((VANILLA / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("vae", "text_encoder", "tokenizer", "unet", "scheduler"):
        assert (VANILLA / part).is_dir(), part
    sched = json.loads((VANILLA / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDIMScheduler" and sched["beta_schedule"] == "scaled_linear"
    assert (sched["beta_start"], sched["beta_end"], sched["clip_sample"]) == (0.00085, 0.012, False)
    assert not list(VANILLA.rglob("*.bin")) and not list(VANILLA.rglob("*.pt"))  # safetensors only
    size_mb = sum(f.stat().st_size for f in VANILLA.rglob("*") if f.is_file()) / 2**20
    assert size_mb <= MAX_VANILLA_MB


def test_generates_64px_images_in_a_few_steps(pipe):
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float32
    out = pipe(["a photo of a red ball on the beach", "a photo of a blue box at night"],
               num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(0))
    images = [np.asarray(im) for im in out.images]
    assert all(im.shape == (64, 64, 3) for im in images)
    assert not np.array_equal(images[0], images[1]) and images[0].std() > 5


def test_personal_token_is_one_vocabulary_word_and_textual_inversion_loads(pipe, tmp_path):
    assert len(pipe.tokenizer.tokenize(PERSONAL_TOKEN)) == 1
    dim = pipe.text_encoder.config.hidden_size
    save_file({"<toy-concept>": torch.randn(1, dim)}, str(tmp_path / "learned_embeds.safetensors"))
    before = len(pipe.tokenizer)
    pipe.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"), token="<toy-concept>")
    try:
        assert len(pipe.tokenizer) == before + 1
        assert "<toy-concept>" in pipe.tokenizer.tokenize("a <toy-concept> star")
    finally:
        pipe.unload_textual_inversion("<toy-concept>")
