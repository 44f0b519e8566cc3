"""Embedding similarities and the paper's pairing: each generated image against every reference."""

from __future__ import annotations

import torch


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def mean_cosine_to_references(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(N, D) x (R, D) -> (N,): each generated image's cosine with every reference, averaged over them.

    This is how CLIP-I and DINO pair images (DreamBooth's protocol): all N*R pairs count, each
    generated image weighs the same.
    """
    if references.shape[0] == 0:
        raise ValueError("no reference embeddings to compare with")
    return (l2_normalize(generated.float()) @ l2_normalize(references.float()).T).mean(dim=1)


def cosine_to_text(images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(N, D) x (D,) or (1, D) -> (N,): CLIP-T, each image against its prompt's text embedding."""
    return l2_normalize(images.float()) @ l2_normalize(text.float().reshape(-1))
