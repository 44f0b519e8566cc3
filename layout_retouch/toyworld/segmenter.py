"""The toy world's stand-in for Segment Anything: the locator oracle behind the Segmenter protocol.

Stage 2 calls it exactly as it calls SAM: an image, a box and an optional point in, a boolean
mask at the image's resolution out. The locator segments the subject of a toy-world image; the
prompt picks which connected region of that mask is meant (the one under the point, else those
touching the box).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from layout_retouch.toyworld.oracles import ORACLE_DIR, load_oracle, to_batch


class ToySegmenter:
    """`segmenters.Segmenter` for toy-world images; `model_id` is the oracle folder (default: shipped)."""

    def __init__(self, model_id: str | Path | None = None, device: str | torch.device = "cpu"):
        self.model = load_oracle("locator", Path(model_id) if model_id else ORACLE_DIR).to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, image: Image.Image, box, point=None) -> np.ndarray:
        logits = self.model(to_batch([image]).to(self.device))[0][0].cpu().numpy()
        mask64 = logits > 0
        h, w = image.height, image.width
        sx, sy = mask64.shape[1] / w, mask64.shape[0] / h
        regions, n = ndimage.label(mask64)
        keep = np.zeros_like(mask64)
        if n:
            if point is not None:
                px = int(np.clip(point[0] * sx, 0, mask64.shape[1] - 1))
                py = int(np.clip(point[1] * sy, 0, mask64.shape[0] - 1))
                if regions[py, px]:
                    keep = regions == regions[py, px]
            if not keep.any():
                x0, y0, x1, y1 = box
                inside = np.zeros_like(mask64)
                inside[int(max(0, np.floor(y0 * sy))):int(np.ceil(y1 * sy)) + 1,
                       int(max(0, np.floor(x0 * sx))):int(np.ceil(x1 * sx)) + 1] = True
                labels = np.unique(regions[inside & mask64])
                keep = np.isin(regions, labels[labels > 0])
        if (h, w) == keep.shape:
            return keep
        return np.asarray(Image.fromarray(keep.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
