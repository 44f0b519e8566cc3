"""Subject photos: every image in a folder, resized and center-cropped to the model's resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from layout_retouch.errors import ImageInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder: str | Path) -> list[Path]:
    """The image files of `folder`, sorted by name (so a run sees them in a fixed order)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageInputError(f"photo folder {str(folder)!r} does not exist; pass a folder of subject photos")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_photo(path: Path, resolution: int) -> torch.Tensor:
    """One photo as a (3, resolution, resolution) tensor in [-1, 1] (the VAE's input range)."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ImageInputError(f"cannot read image {str(path)!r} ({err}); remove it or replace it") from err
    # Shorter side to `resolution`, then the central square, as the diffusers DreamBooth recipe does.
    scale = resolution / min(img.size)
    size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
    img = img.resize(size, Image.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def subject_photos(folder: str | Path) -> list[Path]:
    """The subject photos of `folder`; raises ImageInputError when there are none."""
    paths = list_images(folder)
    if not paths:
        raise ImageInputError(
            f"no images in {str(folder)!r}; put 3-7 photos of the subject there ({', '.join(IMAGE_SUFFIXES)})"
        )
    return paths


def load_photos(paths: list[Path], resolution: int) -> torch.Tensor:
    """The photos as one (N, 3, R, R) batch in [-1, 1]."""
    return torch.stack([load_photo(p, resolution) for p in paths])
