"""End to end: `layout-retouch evaluate` driving the real LayoutRetouchPipeline on a tiny model."""

import json

import numpy as np
import pytest
import torch
from metric_tiny_models import build_tiny_metric_models, make_concept, metric_cli_args
from PIL import Image

from layout_retouch.cli import main
from layout_retouch.config import LayoutRetouchConfig
from layout_retouch.evaluation.concepts import load_concept

pipeline = pytest.importorskip("layout_retouch.pipeline")
tiny_models = pytest.importorskip("layout_retouch.tiny_models")

# A few steps and no SAM (no weights offline): the wiring is under test, not the pictures.
FAST = {"num_inference_steps": 3, "vanilla_steps": 1, "ref_start_step": 1, "segmenter": "none"}


def test_evaluate_runs_the_pipeline_per_method_and_seed(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        models = build_tiny_metric_models(tmp_path / "metric_models")
        base = tiny_models.save_tiny_pipeline(tmp_path / "base")
        concept = load_concept(make_concept(tmp_path / "concepts" / "dog1"))
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a {} in the snow\n")
        config = tmp_path / "config.json"
        config.write_text(json.dumps(FAST))
        out = tmp_path / "out"
        args = ["evaluate", "--concepts", str(concept.folder), "--out", str(out), "--base", str(base),
                "--methods", "I,V", "--prompts", str(prompts), "--seeds", "2", "--config", str(config),
                "--no-progress", *metric_cli_args(models)]
        assert main(args) == 0
        assert len(list((out / "images").rglob("*.png"))) == 4
        assert "V: + adaptive mask blending" in (out / "table.md").read_text()

        # the stored image is what the pipeline gives for that method, seed and reference
        pipe = pipeline.LayoutRetouchPipeline.from_pretrained(str(base), token="sks", class_word="dog")
        expected = pipe("a sks dog in the snow", reference_image=str(concept.reference_image),
                        config=LayoutRetouchConfig(method="V", **FAST),
                        generator=torch.Generator().manual_seed(1)).images[0]
        stored = Image.open(out / "images" / "V" / "dog1" / "prompts" / "p000_seed00001.png").convert("RGB")
        assert np.array_equal(np.asarray(stored), np.asarray(expected.convert("RGB")))
    finally:
        torch.set_num_threads(before)


def test_a_batch_of_seeds_gives_the_one_seed_images(tmp_path):
    """PipelineGenerator.generate_batch: each seed its own generator, so the batch only rounds differently."""
    from layout_retouch.errors import LayoutRetouchError
    from layout_retouch.evaluation.generation import GenerationRequest, PipelineGenerator

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = tiny_models.save_tiny_pipeline(tmp_path / "base")
        concept = load_concept(make_concept(tmp_path / "concepts" / "dog1"))
        config = LayoutRetouchConfig(method="V", **FAST)
        requests = [GenerationRequest(concept, "V", "a sks dog in the snow", seed, config) for seed in (3, 4)]
        generator = PipelineGenerator(str(base))
        batch = generator.generate_batch(requests)
        for request, image in zip(requests, batch, strict=True):
            alone = np.asarray(generator(request), dtype=int)
            assert np.abs(np.asarray(image, dtype=int) - alone).max() <= 1  # 8-bit levels: rounding at most
        assert not np.array_equal(np.asarray(batch[0]), np.asarray(batch[1]))  # two seeds, two images
        with pytest.raises(LayoutRetouchError, match="one concept, method, prompt"):
            generator.generate_batch([requests[0], GenerationRequest(concept, "V", "a sks dog", 5, config)])
    finally:
        torch.set_num_threads(before)
