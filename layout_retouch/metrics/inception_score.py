"""Inception Score: exp(E_x KL(p(y|x) || p(y))), over the class predictions of a set of images.

The exact metric uses torch-fidelity's Inception-v3 (the optional `fidelity` extra). Where that
is not importable, the same formula runs over a transformers ImageNet classifier; the backend's
label travels with every number so the two are never mixed up.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from layout_retouch.errors import LayoutRetouchError
from layout_retouch.metrics.defaults import (  # noqa: F401  (re-exported)
    DEFAULT_IS_CLASSIFIER,
    DEFAULT_IS_SPLITS,
    IS_BACKENDS,
)
from layout_retouch.metrics.loading import load_pretrained, resolve_device


def inception_score(probs: np.ndarray, splits: int = DEFAULT_IS_SPLITS) -> tuple[float, float]:
    """(mean, std over splits) of the Inception Score of (N, C) class probabilities."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] < splits:
        raise ValueError(f"need (N, C) probabilities with N >= splits={splits}, got shape {probs.shape}")
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


class TransformersClassifierProbs:
    """Class probabilities from a transformers image classifier (a stand-in for Inception-v3)."""

    def __init__(self, model_id: str = DEFAULT_IS_CLASSIFIER, device: str | None = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.device = resolve_device(device)
        what = "Inception Score classifier"
        self.model = load_pretrained(AutoModelForImageClassification, model_id, what, "--is-classifier")
        self.model = self.model.to(self.device).eval()
        self.processor = load_pretrained(AutoImageProcessor, model_id, what, "--is-classifier")
        self.label = f"transformers classifier {model_id} (not Inception-v3)"

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        pixels = self.processor(images=[i.convert("RGB") for i in images], return_tensors="pt")[
            "pixel_values"
        ]
        logits = self.model(pixel_values=pixels.to(self.device)).logits.float()
        return torch.softmax(logits, dim=-1).cpu().numpy()


class FidelityInceptionProbs:
    """Class probabilities from torch-fidelity's Inception-v3, as torch-fidelity's own ISC uses."""

    def __init__(self, device: str | None = "cpu") -> None:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.device = resolve_device(device)
        try:
            self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["logits_unbiased"])
        except Exception as err:
            raise LayoutRetouchError(
                f"torch-fidelity could not load its Inception-v3 weights ({err}); they are downloaded on "
                "first use. Run once where the network is reachable, or use --is-backend transformers."
            ) from None
        self.model = self.model.to(self.device).eval()
        self.label = "torch-fidelity Inception-v3"

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        arrays = [np.asarray(i.convert("RGB"), dtype=np.uint8) for i in images]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(self.device)
        (logits,) = self.model(batch)
        return torch.softmax(logits.double(), dim=-1).float().cpu().numpy()


def fidelity_available() -> bool:
    try:
        import torch_fidelity  # noqa: F401
    except Exception:
        return False
    return True


def load_class_probabilities(backend: str = "auto", classifier_id: str = DEFAULT_IS_CLASSIFIER, device="cpu"):
    """A callable images -> (N, C) probabilities, with a `.label` naming the backend."""
    if backend not in IS_BACKENDS:
        raise LayoutRetouchError(
            f"unknown Inception Score backend {backend!r}; choose one of: {', '.join(IS_BACKENDS)}"
        )
    if backend == "torch-fidelity" or (backend == "auto" and fidelity_available()):
        if not fidelity_available():
            raise LayoutRetouchError(
                "--is-backend torch-fidelity asked for, but torch-fidelity is not importable; install the "
                "`fidelity` extra (it needs torchvision) or use --is-backend transformers."
            )
        return FidelityInceptionProbs(device)
    return TransformersClassifierProbs(classifier_id, device)
