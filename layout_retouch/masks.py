"""The adaptive mask M: where the target keeps its own (retouched) features and where the layout's.

M_ca (cross-attention on the subject tokens) is confident but ragged; M_sam (a segmenter on the
layout image) has clean edges but may miss parts. Their cleaned union, softened by a distance
transform, keeps the layout's background while letting the subject's silhouette change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Scale each map of a (..., H, W) tensor to [0, 1]."""
    flat = x.flatten(-2)
    lo, hi = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-8)).view_as(x)


def threshold_map(attention: torch.Tensor, tau: float) -> torch.Tensor:
    """Binary mask of a subject attention map: min-max normalized, above `tau`."""
    return minmax(attention.float()) > tau


def box_and_peak(attention: np.ndarray, tau: float) -> tuple[tuple[float, float, float, float], tuple[float, float]]:
    """Bounding box (x0, y0, x1, y1) of the thresholded map and its peak (x, y), in map pixels."""
    norm = minmax(torch.as_tensor(attention, dtype=torch.float32)).numpy()
    ys, xs = np.nonzero(norm > tau)
    peak_y, peak_x = np.unravel_index(int(np.argmax(norm)), norm.shape)
    if len(xs) == 0:
        return (0.0, 0.0, float(norm.shape[1]), float(norm.shape[0])), (peak_x + 0.5, peak_y + 0.5)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)), (peak_x + 0.5, peak_y + 0.5)


def clean_components(mask_ca: np.ndarray, mask_sam: np.ndarray, min_area: float) -> np.ndarray:
    """Drop the components of M_ca that miss M_sam or cover less than `min_area` of the image.

    With an empty M_sam (no segmenter) only the area rule applies.
    """
    labels, count = ndimage.label(mask_ca)
    if count == 0:
        return mask_ca.astype(bool)
    index = np.arange(1, count + 1)
    areas = ndimage.sum_labels(np.ones_like(mask_ca, dtype=np.float64), labels, index)
    keep = areas >= min_area * mask_ca.size
    if mask_sam.any():
        keep &= ndimage.maximum(mask_sam.astype(np.uint8), labels, index) > 0
    return np.isin(labels, index[keep])


def soften(union: np.ndarray) -> np.ndarray:
    """Euclidean distance to the outside, normalized to [0.5, 1] inside and 0 outside."""
    out = np.zeros(union.shape, dtype=np.float32)
    if not union.any():
        return out
    dist = ndimage.distance_transform_edt(union)
    inside = dist[union]
    lo, hi = inside.min(), inside.max()
    out[union] = 1.0 if hi == lo else 0.5 + 0.5 * (inside - lo) / (hi - lo)
    return out


@dataclass
class AdaptiveMask:
    m_ca: np.ndarray  # thresholded cross-attention mask (bool), before cleaning
    m_sam: np.ndarray  # segmenter mask (bool)
    cleaned: np.ndarray  # M_ca after removing stray components (bool)
    union: np.ndarray  # cleaned M_ca or M_sam (bool)
    final: np.ndarray  # M in [0, 1] (float32)


def adaptive_mask(mask_ca: np.ndarray, mask_sam: np.ndarray, min_area: float) -> AdaptiveMask:
    """M = max(soften(M_sam or clean(M_ca)), clean(M_ca)), all at one resolution.

    An empty union (nothing found) gives M = 1, i.e. no blending, rather than the layout's subject.
    """
    cleaned = clean_components(mask_ca, mask_sam, min_area)
    union = cleaned | mask_sam
    final = np.maximum(soften(union), cleaned.astype(np.float32))
    if not union.any():
        final = np.ones_like(final)
    return AdaptiveMask(mask_ca.astype(bool), mask_sam.astype(bool), cleaned, union, final)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (N, H, W) masks: area averaging when shrinking, bilinear when growing."""
    mode = "area" if size[0] <= mask.shape[-2] else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(mask[:, None].float(), size=size, mode=mode, **kwargs)[:, 0]
