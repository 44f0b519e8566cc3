"""Semantic matching of diffusion features, as DreamMatcher (Nam et al., CVPR 2024) uses it.

Decoder features of the reference and the target are projected together onto their principal axes
(so both live in one space), compared by cosine similarity, and each target pixel is matched to its most
similar reference pixel (the "flow"). A match is trusted where it is cycle-consistent: the reference pixel
matches back to (near) where it came from. Pixels are indexed row-major, `i = y * w + x`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def co_pca(reference: torch.Tensor, target: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, h, w) features of the reference and of one target -> (d, h, w) each, on the principal axes of both.

    An exact SVD rather than DreamMatcher's randomized `pca_lowrank`: the same seed must give the same image.
    """
    c, h, w = reference.shape
    x = torch.cat([reference.reshape(c, -1), target.reshape(c, -1)], 1).T.float()  # (2hw, C)
    x = x - x.mean(0, keepdim=True)
    d = min(dims, *x.shape)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    y = (x @ vh[:d].T).T  # (d, 2hw)
    return y[:, : h * w].reshape(d, h, w), y[:, h * w:].reshape(d, h, w)


def descriptors(reference: list[torch.Tensor], target: list[torch.Tensor], dims: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-scale co-PCA of decoder features (coarse to fine), upsampled to the finest scale, stacked and
    L2-normalized per pixel (DreamMatcher after DIFT: 256 dimensions per scale)."""
    size = reference[-1].shape[-2:]
    refs, tgts = [], []
    for r, t in zip(reference, target, strict=True):
        r, t = co_pca(r, t, dims)
        if r.shape[-2:] != size:
            r, t = (F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0] for x in (r, t))
        refs.append(r)
        tgts.append(t)
    return F.normalize(torch.cat(refs[::-1]), dim=0), F.normalize(torch.cat(tgts[::-1]), dim=0)


def resize_descriptor(desc: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if desc.shape[-2:] != tuple(size):
        desc = F.interpolate(desc[None], size=size, mode="bilinear", align_corners=False)[0]
    return F.normalize(desc, dim=0)


def nearest_matches(target: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D, h, w) unit descriptors -> for each target pixel its most similar reference pixel, and for each
    reference pixel its most similar target pixel (flat indices)."""
    sim = target.flatten(1).T @ reference.flatten(1)  # (hw target, hw reference) cosine similarities
    return sim.argmax(1), sim.argmax(0)


def cycle_error(target_to_reference: torch.Tensor, reference_to_target: torch.Tensor, width: int) -> torch.Tensor:
    """Per target pixel, in pixels: how far from it its match's own match lands (0: a consistent pair)."""
    back = reference_to_target[target_to_reference]
    here = torch.arange(len(back), device=back.device)
    dy = torch.div(here, width, rounding_mode="floor") - torch.div(back, width, rounding_mode="floor")
    dx = here % width - back % width
    return torch.sqrt((dx * dx + dy * dy).float())


def warp(values: torch.Tensor, target_to_reference: torch.Tensor) -> torch.Tensor:
    """Reference values (..., hw, d) moved onto the target's pixels: target pixel i gets reference pixel
    `target_to_reference[i]` (DreamMatcher's flow warp, exact at the integer matches argmax gives)."""
    return values[..., target_to_reference, :]


def confidence(error: torch.Tensor, foreground: torch.Tensor, threshold: float, side: int) -> torch.Tensor:
    """DreamMatcher's cycle-consistency test: error below `threshold` x side x the foreground's share."""
    return (error < threshold * side * foreground.mean()).to(foreground.dtype)
