"""Metric formulas against hand computations on fixed numbers."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from layout_retouch.evaluation.aggregate import ImageResult, aggregate
from layout_retouch.metrics.inception_score import inception_score
from layout_retouch.metrics.layout_diversity import center_spread
from layout_retouch.metrics.protocols import get_protocol
from layout_retouch.metrics.similarity import cosine_to_text, mean_cosine_to_references


def _cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_mean_cosine_pairs_every_generated_image_with_every_reference():
    gen = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    refs = np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0]])
    expected = [sum(_cos(g, r) for r in refs) / len(refs) for g in gen]
    got = mean_cosine_to_references(torch.tensor(gen), torch.tensor(refs))
    assert got.tolist() == pytest.approx(expected)
    # first image: (1 + 0 + 1/sqrt(3)) / 3
    assert got[0].item() == pytest.approx((1 + 1 / math.sqrt(3)) / 3)


def test_cosine_to_text():
    images = torch.tensor([[3.0, 4.0], [0.0, -1.0]])
    assert cosine_to_text(images, torch.tensor([[0.0, 2.0]])).tolist() == pytest.approx([0.8, -1.0])


def test_inception_score_one_hot_uniform_and_mixed():
    assert inception_score(np.eye(5))[0] == pytest.approx(5.0)  # confident and all different: N classes
    assert inception_score(np.full((4, 5), 0.2))[0] == pytest.approx(1.0)  # no confidence: 1
    assert inception_score(np.tile(np.eye(5)[:1], (3, 1)))[0] == pytest.approx(1.0)  # all the same class
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])  # marginal (0.75, 0.25)
    kl = [math.log(1 / 0.75), 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)]
    assert inception_score(probs)[0] == pytest.approx(math.exp(sum(kl) / 2))
    mean, std = inception_score(np.vstack([np.eye(2), np.full((2, 2), 0.5)]), splits=2)
    assert (mean, std) == pytest.approx((1.5, 0.5))


def test_center_spread_is_rms_distance_to_mean():
    assert center_spread(np.array([[0.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.5)
    assert center_spread(np.array([[0.3, 0.3]] * 4)) == 0.0
    c = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    mean = c.mean(axis=0)
    assert center_spread(c) == pytest.approx(math.sqrt(np.mean([np.sum((p - mean) ** 2) for p in c])))


def _result(method, concept, prompt, seed, clip_i, center=(0.5, 0.5)):
    info = dict(method=method, personalization="none", concept=concept, prompt_set="s", prompt_index=prompt,
                template="a {}", seed=seed, image="x.png")
    arrays = {"clip_i": np.array([clip_i]), "center": np.array(center)}
    return ImageResult(info, arrays)


def test_average_per_prompt_then_per_concept_then_over_concepts():
    # concept a: prompt 0 has one image (1.0), prompt 1 three images (0.0) -> 0.5, not the pooled 0.25;
    # concept b: one prompt at 0.2. Method mean = mean over concepts = 0.35.
    results = [_result("V", "a", 0, 0, 1.0)] + [_result("V", "a", 1, s, 0.0) for s in range(3)]
    results += [_result("V", "b", 0, 0, 0.2)]
    tables = aggregate(results)
    by_concept = {r["concept"]: r for r in tables["concepts"]}
    assert by_concept["a"]["clip_i"] == pytest.approx(0.5)
    assert by_concept["a"]["n_prompts"] == 2
    (method,) = tables["methods"]
    assert method["clip_i"] == pytest.approx(0.35)
    assert method["n_images"] == 5
    assert math.isnan(method["dino"])  # not scored: reported as missing, never as 0


def test_protocols_text_and_resize():
    clean, dm = get_protocol("clean"), get_protocol("dreammatcher")
    assert clean.clip_t_text("a {} in the snow", "dog") == "a dog in the snow"
    assert dm.clip_t_text("a {} in the snow", "dog") == "a {} in the snow"
    image = Image.fromarray(np.arange(40 * 30 * 3, dtype=np.uint8).reshape(30, 40, 3))
    assert clean.prepare(image).size == (40, 30)
    assert dm.prepare(image).size == (256, 256)
    assert np.array_equal(np.asarray(dm.prepare(image)), np.asarray(image.resize((256, 256), Image.BICUBIC)))
    assert clean.dino_normalize and not dm.dino_normalize
