"""Segmenters for the adaptive mask's M_sam: Segment Anything, none, or a plug-in.

A segmenter turns the decoded layout image and a prompt (the box and peak point of the layout's
subject cross-attention) into a boolean subject mask at the image's resolution. Plug-ins are named
`module:attr` (a class or factory taking `(model_id, device)`), so a world with its own segmenter
(the toy world's oracle) plugs in exactly as SAM does.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from layout_retouch.errors import ModelLoadError

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
Point = tuple[float, float]  # x, y in pixels


class Segmenter(Protocol):
    def __call__(self, image: Image.Image, box: Box, point: Point | None) -> np.ndarray:
        """Boolean (H, W) mask of the prompted object in `image`."""


class NoSegmenter:
    """Cross-attention only: M_sam is empty, so the union is M_ca alone (kept whole)."""

    def __init__(self, model_id: str | None = None, device: str | torch.device = "cpu"):
        pass

    def __call__(self, image: Image.Image, box: Box, point: Point | None) -> np.ndarray:
        return np.zeros((image.height, image.width), dtype=bool)


class SamSegmenter:
    """Segment Anything through transformers (`SamModel`), prompted with a box and a point."""

    def __init__(self, model_id: str = "facebook/sam-vit-base", device: str | torch.device = "cpu",
                 model=None, processor=None):
        from transformers import SamModel, SamProcessor

        try:
            self.model = model or SamModel.from_pretrained(model_id)
            self.processor = processor or SamProcessor.from_pretrained(model_id)
        except (OSError, ValueError) as err:  # ValueError: a missing folder taken for a malformed hub id
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelLoadError(
                f"cannot load Segment Anything from {model_id!r} ({reason}): pass --segmenter none (cross-attention "
                "masks only) or --sam-model FOLDER (a local copy)"
            ) from err
        self.model.to(device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, image: Image.Image, box: Box, point: Point | None) -> np.ndarray:
        kwargs = {"input_boxes": [[list(map(float, box))]]}
        if point is not None:
            kwargs["input_points"] = [[[list(map(float, point))]]]
            kwargs["input_labels"] = [[[1]]]
        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt", **kwargs)
        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        outputs = self.model(**inputs, multimask_output=True)
        masks = self.processor.image_processor.post_process_masks(
            outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu()
        )[0][0]  # (num_masks, H, W) for the one prompt
        best = int(outputs.iou_scores[0, 0].float().argmax())
        return masks[best].numpy().astype(bool)


BUILTIN = {
    "sam": "layout_retouch.segmenters:SamSegmenter",
    "none": "layout_retouch.segmenters:NoSegmenter",
    "toy": "layout_retouch.toyworld.segmenter:ToySegmenter",
}


def load_segmenter(name: str, model_id: str | None = None, device: str | torch.device = "cpu") -> Segmenter:
    """Build the segmenter called `name` (a built-in name or `module:attr`)."""
    target = BUILTIN.get(name, name)
    if ":" not in target:
        raise ModelLoadError(
            f"unknown segmenter {name!r}; choose one of {', '.join(BUILTIN)} or give module:attr"
        )
    module_name, attr = target.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ModelLoadError(f"segmenter {name!r} ({target}) cannot be imported: {err}") from err
    return factory(model_id, device) if model_id is not None else factory(device=device)
