"""Writing results so that nothing is lost or silently replaced: atomic files, parameters beside them."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from layout_retouch.errors import LayoutRetouchError


def slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def _readable_temp(folder: Path, name: str) -> tuple[int, str]:
    """A temporary file beside the result, with the permissions a plain open() would give it
    (mkstemp makes it owner-only)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _readable_temp(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_png(image: Image.Image, path: Path, parameters: dict | None = None) -> Path:
    """PNG with its parameters in a text chunk (key `parameters`), written atomically."""
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", json.dumps(parameters, default=str))
    fd, tmp = _readable_temp(path.parent, path.name)
    os.close(fd)
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_result(image: Image.Image, path: Path, parameters: dict) -> Path:
    """The image (parameters embedded) and a JSON sidecar; the sidecar is written last, so its
    presence marks a finished result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(image, path, parameters)
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(parameters, indent=2, default=str).encode())
    return path


def is_finished(path: Path) -> bool:
    return path.is_file() and path.with_suffix(".json").is_file()


def check_not_overwriting(paths: list[Path], overwrite: bool, skip_existing: bool) -> list[Path]:
    """The paths still to produce; an existing one is an error unless overwriting or skipping."""
    existing = [p for p in paths if is_finished(p)]
    if existing and not (overwrite or skip_existing):
        raise LayoutRetouchError(
            f"{len(existing)} output(s) already exist (e.g. {existing[0]}); pass --skip-existing to resume "
            "or --overwrite to replace them"
        )
    return [p for p in paths if overwrite or not is_finished(p)]


def mask_image(mask: np.ndarray, size: tuple[int, int] | None = None) -> Image.Image:
    """A [0, 1] or boolean mask as a grey PNG, optionally enlarged (nearest) for viewing."""
    image = Image.fromarray((np.clip(np.asarray(mask, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8))
    return image.resize(size, Image.NEAREST) if size else image
