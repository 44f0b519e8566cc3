"""Per-image scoring: every metric that needs only one image and its concept, stored per image.

Group metrics (Inception Score, center spread) are computed later from what is stored here
(class probabilities, subject centers), so the work shards by image and resumes per image.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from layout_retouch.errors import LayoutRetouchError
from layout_retouch.evaluation.concepts import Concept
from layout_retouch.evaluation.jobs import Job
from layout_retouch.metrics.clip_scores import DEFAULT_CLIP_MODEL, ClipScorer
from layout_retouch.metrics.defaults import METRIC_FAMILIES  # noqa: F401  (re-exported)
from layout_retouch.metrics.dino import DEFAULT_DINO_MODEL, DinoScorer
from layout_retouch.metrics.inception_score import (
    DEFAULT_IS_CLASSIFIER,
    fidelity_available,
    load_class_probabilities,
)
from layout_retouch.metrics.layout_diversity import DEFAULT_DETECTOR_MODEL, SubjectCenterDetector
from layout_retouch.metrics.loading import check_available
from layout_retouch.metrics.preference import (
    DEFAULT_PICKSCORE_MODEL,
    DEFAULT_PICKSCORE_PROCESSOR,
    PREFERENCE_METRICS,
    load_preference_scorer,
)
from layout_retouch.metrics.protocols import get_protocol
from layout_retouch.metrics.similarity import cosine_to_text, mean_cosine_to_references


@dataclass(frozen=True)
class MetricSettings:
    metrics: tuple[str, ...] = METRIC_FAMILIES
    protocol: str = "clean"
    clip_model: str = DEFAULT_CLIP_MODEL
    dino_model: str = DEFAULT_DINO_MODEL
    preference: str = "pickscore"
    pickscore_model: str = DEFAULT_PICKSCORE_MODEL
    pickscore_processor: str = DEFAULT_PICKSCORE_PROCESSOR
    is_backend: str = "auto"
    is_classifier: str = DEFAULT_IS_CLASSIFIER
    detector_model: str = DEFAULT_DETECTOR_MODEL
    device: str | None = field(default="auto", compare=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics) - set(METRIC_FAMILIES))
        if unknown:
            raise LayoutRetouchError(f"unknown metrics {unknown}; choose from: {', '.join(METRIC_FAMILIES)}")
        get_protocol(self.protocol)
        if self.preference not in PREFERENCE_METRICS:
            raise LayoutRetouchError(f"unknown preference metric {self.preference!r}")

    @property
    def inception_label(self) -> str:
        """Which classifier the Inception Score uses, stated in every output."""
        if self.is_backend == "torch-fidelity" or (self.is_backend == "auto" and fidelity_available()):
            return "torch-fidelity Inception-v3"
        return f"transformers classifier {self.is_classifier} (not Inception-v3)"

    def signature(self) -> str:
        """What a stored score depends on; a record with another signature is scored again."""
        data = {k: v for k, v in asdict(self).items() if k != "device"}
        data["inception_label"] = self.inception_label
        return json.dumps(data, sort_keys=True)


class MetricSuite:
    """Loads the metric models on first use and scores one image at a time."""

    def __init__(self, settings: MetricSettings) -> None:
        self.settings = settings
        self._models: dict[str, object] = {}
        self._references: dict[tuple[str, str], np.ndarray] = {}

    def _model(self, name: str):
        if name not in self._models:
            s = self.settings
            if name == "clip":
                self._models[name] = ClipScorer(s.clip_model, s.device, s.protocol)
            elif name == "dino":
                self._models[name] = DinoScorer(s.dino_model, s.device, s.protocol)
            elif name == "preference":
                ids = {}
                if s.preference == "pickscore":
                    ids = {"model_id": s.pickscore_model, "processor_id": s.pickscore_processor}
                self._models[name] = load_preference_scorer(s.preference, s.device, s.protocol, **ids)
            elif name == "inception":
                self._models[name] = load_class_probabilities(s.is_backend, s.is_classifier, s.device)
            elif name == "layout":
                self._models[name] = SubjectCenterDetector(s.detector_model, s.device)
        return self._models[name]

    def check_available(self) -> None:
        """Raise the missing-weights error now, before any generation, without loading models."""
        s = self.settings
        wanted = {
            "clip": [(s.clip_model, "CLIP model (CLIP-I, CLIP-T)", "--clip-model")],
            "dino": [(s.dino_model, "DINO model", "--dino-model")],
            "preference": [
                (s.pickscore_model, "PickScore model", "--pickscore-model"),
                (s.pickscore_processor, "PickScore processor", "--pickscore-processor"),
            ]
            if s.preference == "pickscore"
            else [],
            "inception": [(s.is_classifier, "Inception Score classifier", "--is-classifier")]
            if "transformers" in s.inception_label
            else [],
            "layout": [(s.detector_model, "subject detector (layout diversity)", "--detector-model")],
        }
        for family in s.metrics:
            for model_id, what, flag in wanted[family]:
                check_available(model_id, what, flag)
        if "preference" in s.metrics and s.preference == "imagereward":
            self._model("preference")  # says at once that ImageReward cannot be used here

    def load_all(self) -> None:
        """Load every enabled model now, so that missing weights fail before any work."""
        for name in self.settings.metrics:
            self._model(name)

    def _reference_embeddings(self, family: str, concept: Concept):
        key = (family, str(concept.folder))
        if key not in self._references:
            images = [Image.open(p).convert("RGB") for p in concept.images]
            self._references[key] = self._model(family).image_embeddings(images)
        return self._references[key]

    def score(self, job: Job, image: Image.Image) -> dict[str, np.ndarray]:
        """Named arrays for one image (scalars as shape (1,))."""
        enabled = self.settings.metrics
        protocol = get_protocol(self.settings.protocol)
        concept = job.concept
        out: dict[str, np.ndarray] = {}

        def scalar(value) -> np.ndarray:
            return np.asarray([float(value)], dtype=np.float64)

        if "clip" in enabled:
            clip = self._model("clip")
            emb = clip.image_embeddings([image])
            refs = self._reference_embeddings("clip", concept)
            text = clip.text_embeddings([protocol.clip_t_text(job.template, concept.class_word)])
            out["clip_i"] = scalar(mean_cosine_to_references(emb, refs)[0])
            out["clip_t"] = scalar(cosine_to_text(emb, text)[0])
            out["clip_embedding"] = emb[0].numpy().astype(np.float32)
        if "dino" in enabled:
            dino = self._model("dino")
            out["dino"] = scalar(dino.dino([image], self._reference_embeddings("dino", concept))[0])
        if "preference" in enabled:
            text = job.template.replace("{}", concept.class_word)
            out["preference"] = scalar(self._model("preference").score([image], text)[0])
        if "inception" in enabled:
            out["is_probs"] = self._model("inception")([image])[0].astype(np.float64)
        if "layout" in enabled:
            centers, scores = self._model("layout").centers([image], concept.class_word)
            out["center"] = centers[0].astype(np.float64)
            out["center_score"] = scalar(scores[0])
        return out
