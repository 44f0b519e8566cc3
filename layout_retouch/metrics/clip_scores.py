"""CLIP-I (identity) and CLIP-T (prompt fidelity) with CLIP ViT-B/32, as in the paper."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from layout_retouch.metrics.defaults import DEFAULT_CLIP_MODEL  # noqa: F401  (re-exported)
from layout_retouch.metrics.loading import load_pretrained, resolve_device
from layout_retouch.metrics.protocols import MetricProtocol, get_protocol
from layout_retouch.metrics.similarity import cosine_to_text, l2_normalize, mean_cosine_to_references


class ClipScorer:
    """CLIP image and text embeddings; `clip_i` and `clip_t` apply the paper's pairing."""

    def __init__(
        self,
        model_id: str = DEFAULT_CLIP_MODEL,
        device: str | None = "cpu",
        protocol: str | MetricProtocol = "clean",
    ) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.model_id = model_id
        self.device = resolve_device(device)
        self.protocol = get_protocol(protocol)
        what = "CLIP model (CLIP-I, CLIP-T)"
        self.model = load_pretrained(CLIPModel, model_id, what, "--clip-model").to(self.device).eval()
        self.processor = load_pretrained(CLIPProcessor, model_id, what, "--clip-model")

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) unit-norm image embeddings on the CPU."""
        pixels = self.processor(images=[self.protocol.prepare(i) for i in images], return_tensors="pt")
        out = self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device))
        return l2_normalize(out.pooler_output.float().cpu())

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        return l2_normalize(self.model.get_text_features(**tokens).pooler_output.float().cpu())

    def clip_i(self, images: Sequence[Image.Image], reference_embeddings: torch.Tensor) -> torch.Tensor:
        """(N,) mean cosine of each image with every reference image of the concept."""
        return mean_cosine_to_references(self.image_embeddings(images), reference_embeddings)

    def clip_t(self, images: Sequence[Image.Image], template: str, class_word: str) -> torch.Tensor:
        """(N,) cosine of each image with the prompt text (subject phrase -> class word, per protocol)."""
        text = self.text_embeddings([self.protocol.clip_t_text(template, class_word)])
        return cosine_to_text(self.image_embeddings(images), text)
