"""Subject photos (every image in a folder) and their optional subject masks, center-cropped alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from layout_retouch.errors import ImageInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(
    folder: str | Path, what: str = "photo folder", hint: str = "pass a folder of subject photos"
) -> list[Path]:
    """The image files of `folder`, sorted by name (so a run sees them in a fixed order)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageInputError(f"{what} {str(folder)!r} does not exist; {hint}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _open(path: Path, mode: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except (UnidentifiedImageError, OSError) as err:
        raise ImageInputError(f"cannot read image {str(path)!r} ({err}); remove it or replace it") from err


def _center_square(img: Image.Image, resolution: int) -> Image.Image:
    # Shorter side to `resolution`, then the central square, as the diffusers DreamBooth recipe does.
    scale = resolution / min(img.size)
    size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
    img = img.resize(size, Image.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def load_photo(path: Path, resolution: int) -> torch.Tensor:
    """One photo as a (3, resolution, resolution) tensor in [-1, 1] (the VAE's input range)."""
    array = np.asarray(_center_square(_open(path, "RGB"), resolution), dtype=np.float32) / 127.5 - 1.0
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


def subject_masks(photos: list[Path], folder: str | Path) -> list[Path]:
    """The mask of each photo in `folder`: the image file with the photo's stem (white = subject)."""
    folder = Path(folder)
    if folder.is_dir() and any(p.parent.resolve() == folder.resolve() for p in photos):
        raise ImageInputError(f"the subject masks need a folder of their own: in {str(folder)!r} they would "
                              "be read as photos too")
    by_stem = {p.stem: p for p in list_images(folder, "subject mask folder", "pass a folder with a mask per photo")}
    missing = [p.name for p in photos if p.stem not in by_stem]
    if missing:
        raise ImageInputError(
            f"no subject mask in {str(folder)!r} for {', '.join(missing)}; give each photo a mask image of the "
            "same name (white = subject, black = background)"
        )
    return [by_stem[p.stem] for p in photos]


def load_masks(paths: list[Path], resolution: int) -> torch.Tensor:
    """The masks as one (N, 1, R, R) batch in [0, 1], cropped as the photos are; an empty mask is an error."""
    masks = []
    for path in paths:
        array = np.asarray(_center_square(_open(path, "L"), resolution), dtype=np.float32) / 255.0
        if array.max() < 0.5:
            raise ImageInputError(f"subject mask {str(path)!r} marks nothing as subject (white = subject)")
        masks.append(torch.from_numpy(array)[None])
    return torch.stack(masks)
