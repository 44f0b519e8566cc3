"""Writing results so that nothing is lost or silently replaced: atomic files, parameters beside them."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from layout_retouch.errors import LayoutRetouchError


def slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def digest(value, length: int = 10) -> str:
    """Short hex digest of a string exactly as given, or of a JSON value in canonical form."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def prompt_folder(prompt: str, limit: int = 40) -> str:
    """A folder name per prompt that cannot collide: a readable slug (accents folded to ASCII) plus a
    digest of the exact prompt, so prompts differing in punctuation, case, past the slug's length or in
    non-ASCII text never share a folder."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    readable = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")[:limit].strip("-") or "prompt"
    return f"{readable}-{digest(prompt, 8)}"


def plain_file_mode() -> int:
    """The permissions a plain open() gives a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _readable_temp(folder: Path, name: str) -> tuple[int, str]:
    """A temporary file beside the result, with the permissions a plain open() would give it
    (mkstemp makes it owner-only)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.chmod(tmp, plain_file_mode())
    return fd, tmp


def make_readable(folder: Path) -> None:
    """Give every file under `folder` a plain open()'s permissions (safetensors writes owner-only files)."""
    mode = plain_file_mode()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


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


# Settings that change speed or memory, not the image beyond float rounding: not part of a result's key.
PERFORMANCE_FIELDS = ("record_layout_features", "layout_feature_budget_mb", "cache_reference_features",
                      "reference_feature_budget_mb", "feature_offload", "device_feature_budget_mb",
                      "skip_replaced_attention", "share_inversion_calls", "inversion_cache_dir", "extra",
                      "truncate_inversion", "defer_reference_reconstruction")


def image_config(config: dict) -> dict:
    """A config's values that make the image (as JSON would hold them), for comparing two results."""
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in PERFORMANCE_FIELDS}, default=str))


OUTPUT_KEY = "output_key"  # the sidecar's record of the parameters that make the image


def is_finished(path: Path) -> bool:
    return path.is_file() and path.with_suffix(".json").is_file()


def recorded_key(path: Path) -> dict | None:
    """The output key in a finished result's sidecar (None: unreadable, or written without one)."""
    try:
        return json.loads(path.with_suffix(".json").read_text()).get(OUTPUT_KEY)
    except (OSError, ValueError, AttributeError):
        return None


def _differences(recorded: dict | None, wanted: dict) -> str:
    if not isinstance(recorded, dict):
        return "no recorded parameters"
    keys = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
    return ", ".join(keys)


def check_not_overwriting(planned: dict[Path, dict], overwrite: bool, skip_existing: bool) -> list[Path]:
    """The paths still to produce, given each path's output key (the parameters that make its image).

    An existing result is an error unless overwriting, or skipping one whose recorded key equals the
    wanted one: `--skip-existing` never takes another result for this one because the name matches.
    """
    wanted = {path: json.loads(json.dumps(key, sort_keys=True, default=str)) for path, key in planned.items()}
    existing = [p for p in wanted if is_finished(p)]
    if overwrite:
        return list(wanted)
    if existing and not skip_existing:
        raise LayoutRetouchError(
            f"{len(existing)} output(s) already exist (e.g. {existing[0]}); pass --skip-existing to resume "
            "or --overwrite to replace them"
        )
    for path in existing:
        recorded = recorded_key(path)
        if recorded != wanted[path]:
            raise LayoutRetouchError(
                f"{path} holds a result made with other parameters ({_differences(recorded, wanted[path])}); "
                "--skip-existing keeps only results of the same parameters: pass another --out or --overwrite"
            )
    return [p for p in wanted if p not in existing]


def mask_image(mask: np.ndarray, size: tuple[int, int] | None = None) -> Image.Image:
    """A [0, 1] or boolean mask as a grey PNG, optionally enlarged (nearest) for viewing."""
    image = Image.fromarray((np.clip(np.asarray(mask, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8))
    return image.resize(size, Image.NEAREST) if size else image
