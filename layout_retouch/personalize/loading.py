"""Load what `personalize` wrote back into a plain diffusers pipeline (the inverse of each `save`).

The Layout-and-Retouch loader (models.py) has its own logic; this one serves sampling the plain
personalized model and checking that saved files round-trip.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import StableDiffusionPipeline

from layout_retouch.errors import ModelLoadError
from layout_retouch.personalize.base import load_base_pipeline
from layout_retouch.personalize.common import METADATA_FILE
from layout_retouch.personalize.lora import LORA_WEIGHTS_FILE
from layout_retouch.personalize.textual_inversion import EMBEDS_FILE


def detect_method(folder: str | Path) -> str:
    """dreambooth / lora / textual_inversion, from the metadata file or the files present."""
    folder = Path(folder)
    if (folder / METADATA_FILE).is_file():
        return json.loads((folder / METADATA_FILE).read_text())["method"]
    for name, method in (("model_index.json", "dreambooth"), (LORA_WEIGHTS_FILE, "lora"),
                         (EMBEDS_FILE, "textual_inversion")):
        if (folder / name).is_file():
            return method
    raise ModelLoadError(f"{str(folder)!r} holds no DreamBooth folder, LoRA or Textual Inversion file")


def load_personalized_pipeline(base: str, personalized: str | Path, device: str = "cpu",
                               token: str | None = None) -> StableDiffusionPipeline:
    """The base pipeline with the personalization applied, in float32.

    A DreamBooth folder written with `omit_unchanged` takes its missing components from `base`.
    """
    folder = Path(personalized)
    method = detect_method(folder)
    meta = json.loads((folder / METADATA_FILE).read_text()) if (folder / METADATA_FILE).is_file() else {}
    pipe = load_base_pipeline(base, device)
    if method == "dreambooth":
        borrowed = {name: getattr(pipe, name) for name in meta.get("omitted_components", [])}
        return load_base_pipeline(str(folder), device, **borrowed)
    if method == "lora":
        pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHTS_FILE)
        return pipe
    pipe.load_textual_inversion(str(folder / EMBEDS_FILE), token=token or meta.get("token"))
    return pipe
