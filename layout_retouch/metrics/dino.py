"""DINO identity score: ViT-S/16 self-supervised CLS embeddings, each image against every reference."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from layout_retouch.metrics.defaults import DEFAULT_DINO_MODEL  # noqa: F401  (re-exported)
from layout_retouch.metrics.loading import load_pretrained, resolve_device
from layout_retouch.metrics.protocols import MetricProtocol, get_protocol
from layout_retouch.metrics.similarity import l2_normalize, mean_cosine_to_references


class DinoScorer:
    def __init__(
        self,
        model_id: str = DEFAULT_DINO_MODEL,
        device: str | None = "cpu",
        protocol: str | MetricProtocol = "clean",
    ) -> None:
        from transformers import AutoImageProcessor, ViTModel

        self.model_id = model_id
        self.device = resolve_device(device)
        self.protocol = get_protocol(protocol)
        what = "DINO model"
        self.model = load_pretrained(ViTModel, model_id, what, "--dino-model", add_pooling_layer=False)
        self.model = self.model.to(self.device).eval()
        self.processor = load_pretrained(AutoImageProcessor, model_id, what, "--dino-model")

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) unit-norm CLS-token embeddings (the last layer's first token, as DINO evaluates)."""
        pixels = self.processor(
            images=[self.protocol.prepare(i) for i in images],
            do_normalize=self.protocol.dino_normalize,
            return_tensors="pt",
        )["pixel_values"]
        hidden = self.model(pixel_values=pixels.to(self.device)).last_hidden_state
        return l2_normalize(hidden[:, 0].float().cpu())

    def dino(self, images: Sequence[Image.Image], reference_embeddings: torch.Tensor) -> torch.Tensor:
        return mean_cosine_to_references(self.image_embeddings(images), reference_embeddings)
