"""Crash-safe files: each output is written to a temporary name and renamed into place.

`os.replace` is atomic on one filesystem, so an interrupted run leaves either the whole file or
none; a rerun only has to check that a file exists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

TEMP_MARK = ".partial"
INFO_KEY = "layout_retouch"  # the PNG text chunk that holds an image's generation parameters


def _temp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}")


def save_image_atomic(image: Image.Image, path: str | Path, info: dict | None = None) -> Path:
    """PNG with `info` in a text chunk (the generation parameters), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    chunk = PngImagePlugin.PngInfo()
    if info:
        chunk.add_text(INFO_KEY, json.dumps(info, sort_keys=True))
    tmp = _temp_path(path)
    image.save(tmp, format="PNG", pnginfo=chunk)
    os.replace(tmp, path)
    return path


def save_record_atomic(arrays: dict[str, np.ndarray], metadata: dict[str, str], path: str | Path) -> Path:
    """A per-image score record: named arrays plus string metadata, one safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def load_record(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with safe_open(str(path), framework="np") as f:
        metadata = f.metadata() or {}
    return load_file(str(path)), metadata


def read_record_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="np") as f:
        return f.metadata() or {}


def remove_stale_temps(folder: str | Path) -> int:
    """Delete temporary files a killed run left behind; returns how many."""
    count = 0
    for p in Path(folder).rglob(f"*{TEMP_MARK}*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            count += 1
    return count
