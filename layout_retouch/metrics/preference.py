"""Human-preference scores: PickScore through transformers; ImageReward where its package imports."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from layout_retouch.errors import LayoutRetouchError
from layout_retouch.metrics.defaults import (  # noqa: F401  (re-exported)
    DEFAULT_PICKSCORE_MODEL,
    DEFAULT_PICKSCORE_PROCESSOR,
    PREFERENCE_METRICS,
)
from layout_retouch.metrics.loading import load_pretrained, resolve_device
from layout_retouch.metrics.protocols import MetricProtocol, get_protocol
from layout_retouch.metrics.similarity import cosine_to_text


class PickScorer:
    """PickScore: the tuned CLIP's logit scale times the image-text cosine (higher is preferred)."""

    name = "pickscore"

    def __init__(
        self,
        model_id: str = DEFAULT_PICKSCORE_MODEL,
        processor_id: str = DEFAULT_PICKSCORE_PROCESSOR,
        device: str | None = "cpu",
        protocol: str | MetricProtocol = "clean",
    ) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.device = resolve_device(device)
        self.protocol = get_protocol(protocol)
        self.model = load_pretrained(CLIPModel, model_id, "PickScore model", "--pickscore-model")
        self.model = self.model.to(self.device).eval()
        self.processor = load_pretrained(
            CLIPProcessor, processor_id, "PickScore processor", "--pickscore-processor"
        )

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], text: str) -> torch.Tensor:
        pixels = self.processor(images=[self.protocol.prepare(i) for i in images], return_tensors="pt")
        tokens = self.processor(text=[text], return_tensors="pt", padding=True, truncation=True)
        image_emb = self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device))
        text_emb = self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()})
        scale = self.model.logit_scale.exp().float().cpu()
        return scale * cosine_to_text(image_emb.pooler_output.cpu(), text_emb.pooler_output.cpu())


class ImageRewardScorer:
    """ImageReward through its own package (`image-reward`), which needs transformers 4."""

    name = "imagereward"

    def __init__(self, model_id: str = "ImageReward-v1.0", device: str | None = "cpu") -> None:
        try:
            import ImageReward  # noqa: N813
        except Exception as err:  # its import fails in several ways under transformers 5
            import transformers

            raise LayoutRetouchError(
                f"ImageReward is unavailable: its package cannot be imported here ({type(err).__name__}: "
                f"{str(err)[:200]}); it needs transformers 4 and torchvision, and this environment has "
                f"transformers {transformers.__version__}. Use --preference pickscore (the default), or "
                "run the scoring in an environment with image-reward installed."
            ) from None
        self.model = ImageReward.load(model_id, device=resolve_device(device))

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], text: str) -> torch.Tensor:
        return torch.tensor([float(self.model.score(text, [image])) for image in images])


def load_preference_scorer(name: str, device: str | None = "cpu", protocol: str = "clean", **model_ids: str):
    """`pickscore` (model_id, processor_id overridable) or `imagereward`."""
    if name == "pickscore":
        return PickScorer(device=device, protocol=protocol, **model_ids)
    if name == "imagereward":
        return ImageRewardScorer(device=device, **model_ids)
    raise LayoutRetouchError(
        f"unknown preference metric {name!r}; choose one of: {', '.join(PREFERENCE_METRICS)}"
    )
