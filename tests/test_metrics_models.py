"""Metric scorers on tiny random CLIP / ViT / OWLv2 models loaded from local folders."""

import numpy as np
import pytest
import torch
from metric_tiny_models import build_tiny_metric_models
from PIL import Image

from layout_retouch.errors import LayoutRetouchError, ModelLoadError
from layout_retouch.metrics.clip_scores import ClipScorer
from layout_retouch.metrics.dino import DinoScorer
from layout_retouch.metrics.inception_score import load_class_probabilities
from layout_retouch.metrics.layout_diversity import SubjectCenterDetector, padded_box_center
from layout_retouch.metrics.preference import PickScorer, load_preference_scorer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_tiny_metric_models(tmp_path_factory.mktemp("metric_models"))


def _images(n, size=(48, 40), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def test_clip_i_and_clip_t_match_a_hand_computation(models):
    from transformers import CLIPModel, CLIPProcessor

    scorer = ClipScorer(models["clip"], device="cpu")
    gen, refs = _images(2, seed=1), _images(3, seed=2)
    model, proc = CLIPModel.from_pretrained(models["clip"]), CLIPProcessor.from_pretrained(models["clip"])
    with torch.no_grad():
        g = _unit(model.get_image_features(**proc(images=gen, return_tensors="pt")).pooler_output)
        r = _unit(model.get_image_features(**proc(images=refs, return_tensors="pt")).pooler_output)
        text = proc(text=["a dog in the snow"], return_tensors="pt")
        t = _unit(model.get_text_features(**text).pooler_output)
    expected_i = [np.mean([float(g[i] @ r[j]) for j in range(3)]) for i in range(2)]
    got_i = scorer.clip_i(gen, scorer.image_embeddings(refs))
    assert got_i.tolist() == pytest.approx(expected_i, abs=1e-5)
    got_t = scorer.clip_t(gen, "a {} in the snow", "dog")
    assert got_t.tolist() == pytest.approx([float(g[i] @ t[0]) for i in range(2)], abs=1e-5)
    # the DreamMatcher protocol scores against the literal template and on 256 px bicubic inputs
    dm = ClipScorer(models["clip"], device="cpu", protocol="dreammatcher")
    literal = dm.text_embeddings(["a {} in the snow"])
    resized = [im.resize((256, 256), Image.BICUBIC) for im in gen]
    assert dm.clip_t(gen, "a {} in the snow", "dog").tolist() == pytest.approx(
        (scorer.image_embeddings(resized) @ literal[0]).tolist(), abs=1e-5
    )


def test_dino_uses_cls_token_and_protocol_normalization(models):
    from transformers import ViTImageProcessor, ViTModel

    gen = _images(2, seed=3)
    model = ViTModel.from_pretrained(models["dino"], add_pooling_layer=False)
    proc = ViTImageProcessor.from_pretrained(models["dino"])
    with torch.no_grad():
        cls = model(**proc(images=gen, return_tensors="pt")).last_hidden_state[:, 0]
        raw = proc(images=[i.resize((256, 256), Image.BICUBIC) for i in gen], do_normalize=False,
                   return_tensors="pt")
        cls_raw = model(**raw).last_hidden_state[:, 0]
    assert raw["pixel_values"].min() >= 0.0  # un-normalized: [0, 1] pixels
    clean = DinoScorer(models["dino"], device="cpu").image_embeddings(gen)
    dm = DinoScorer(models["dino"], device="cpu", protocol="dreammatcher").image_embeddings(gen)
    assert torch.allclose(clean, _unit(cls), atol=1e-5)
    assert torch.allclose(dm, _unit(cls_raw), atol=1e-5)
    assert not torch.allclose(clean, dm, atol=1e-3)


def test_pickscore_is_logit_scale_times_cosine(models):
    scorer = PickScorer(models["clip"], models["clip"], device="cpu")
    clip = ClipScorer(models["clip"], device="cpu")
    gen = _images(2, seed=4)
    cos = clip.image_embeddings(gen) @ clip.text_embeddings(["a dog"])[0]
    scale = scorer.model.logit_scale.exp().item()
    assert scorer.score(gen, "a dog").tolist() == pytest.approx((scale * cos).tolist(), abs=1e-4)


def test_inception_fallback_is_labelled_and_gives_probabilities(models):
    probs_fn = load_class_probabilities("transformers", models["classifier"], "cpu")
    assert "not Inception-v3" in probs_fn.label and models["classifier"] in probs_fn.label
    probs = probs_fn(_images(3))
    assert probs.shape == (3, 10)
    assert probs.sum(axis=1) == pytest.approx(np.ones(3), abs=1e-5)


def test_detector_gives_one_center_per_image_inside_it(models):
    det = SubjectCenterDetector(models["owl"], device="cpu")
    centers, scores = det.centers(_images(3, size=(64, 32), seed=5), "dog")
    assert centers.shape == (3, 2) and scores.shape == (3,)
    assert ((centers >= 0) & (centers <= 1)).all() and ((scores >= 0) & (scores <= 1)).all()


def test_padded_box_center_maps_square_fractions_to_the_image():
    # a 64x32 image padded to 64x64: a box center at (0.5, 0.25) of the square is the image's middle
    assert padded_box_center((0.5, 0.25), 64, 32) == pytest.approx((0.5, 0.5))
    assert padded_box_center((0.25, 0.5), 32, 64) == pytest.approx((0.5, 0.5))
    assert padded_box_center((0.5, 0.75), 64, 32) == pytest.approx((0.5, 1.0))  # in the padding: clipped
    assert padded_box_center((0.2, 0.7), 50, 50) == pytest.approx((0.2, 0.7))


def test_missing_weights_give_one_clear_error(tmp_path):
    for make in (lambda: ClipScorer(str(tmp_path / "nope"), device="cpu"),
                 lambda: ClipScorer("openai/clip-vit-base-patch32", device="cpu"),
                 lambda: DinoScorer("facebook/dino-vits16", device="cpu"),
                 lambda: SubjectCenterDetector(str(tmp_path / "owl"), device="cpu")):
        with pytest.raises(ModelLoadError) as err:
            make()
        message = str(err.value)
        assert "cannot load" in message and "local folder" in message and "--" in message
    with pytest.raises(ModelLoadError, match="openai/clip-vit-base-patch32"):
        ClipScorer("openai/clip-vit-base-patch32", device="cpu")


def test_imagereward_says_it_is_unavailable():
    with pytest.raises(LayoutRetouchError, match="ImageReward is unavailable.*transformers"):
        load_preference_scorer("imagereward")
    with pytest.raises(LayoutRetouchError, match="unknown preference"):
        load_preference_scorer("hps")
