"""Concept datasets: a folder per concept with its photos and a `concept.json` metadata file.

    my_concepts/
      brown_dog/
        concept.json    {"token": "sks", "class_word": "dog", "live": true,
                         "reference_image": "03.jpg", "weights": "dreambooth/brown_dog",
                         "weights_kind": "dreambooth"}
        00.jpg 01.jpg ...

`weights` (relative to the concept folder, or absolute) is the personalized model given to the
pipeline, `weights_kind` its kind (dreambooth, lora, textual_inversion, custom_diffusion; absent:
detected). Every photo is a reference for CLIP-I and DINO; `reference_image` is the one Stage 2
inverts (default: the first photo by name).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from layout_retouch.errors import ImageInputError, LayoutRetouchError

METADATA_FILE = "concept.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
WEIGHT_KINDS = ("dreambooth", "lora", "textual_inversion", "custom_diffusion")
REQUIRED_KEYS = ("token", "class_word")


@dataclass(frozen=True)
class Concept:
    name: str
    folder: Path
    token: str
    class_word: str
    live: bool
    images: tuple[Path, ...]
    reference_image: Path
    weights: str | None = None
    weights_kind: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def subject_phrase(self) -> str:
        """What replaces `{}` in a prompt template for generation, e.g. `sks dog`."""
        return f"{self.token} {self.class_word}"

    @property
    def personalization(self) -> str:
        """Label of the personalization for reports (Table 1 groups rows by it)."""
        return self.weights_kind or ("none" if self.weights is None else "auto")


def concept_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_concept(folder: str | Path) -> Concept:
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageInputError(f"concept folder {str(folder)!r} does not exist")
    meta_path = folder / METADATA_FILE
    if not meta_path.is_file():
        raise LayoutRetouchError(
            f"concept folder {str(folder)!r} has no {METADATA_FILE}; write one with at least "
            f'{{"token": "sks", "class_word": "dog"}} (see layout_retouch/evaluation/concepts.py)'
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LayoutRetouchError(f"{meta_path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict):
        raise LayoutRetouchError(f'{meta_path} holds a JSON {type(meta).__name__}; it needs an object, e.g. '
                                 '{"token": "sks", "class_word": "dog"}')
    missing = [k for k in REQUIRED_KEYS if not meta.get(k)]
    if missing:
        raise LayoutRetouchError(f"{meta_path} lacks {', '.join(missing)}")
    wrong = [k for k in ("token", "class_word", "reference_image", "weights", "weights_kind")
             if meta.get(k) is not None and not isinstance(meta[k], str)]
    if wrong:
        raise LayoutRetouchError(f"{meta_path}: {wrong[0]!r} must be a string, got {json.dumps(meta[wrong[0]])}")
    images = concept_images(folder)
    if not images:
        raise ImageInputError(
            f"concept folder {str(folder)!r} has no images ({', '.join(IMAGE_SUFFIXES)}); put the "
            "concept's photos in it: they are the references for CLIP-I and DINO"
        )
    reference = folder / meta["reference_image"] if meta.get("reference_image") else images[0]
    if not reference.is_file():
        raise ImageInputError(f"reference image {str(reference)!r} named in {meta_path} does not exist")
    kind = meta.get("weights_kind")
    if kind is not None and kind not in WEIGHT_KINDS:
        choices = ", ".join(WEIGHT_KINDS)
        raise LayoutRetouchError(f"{meta_path}: weights_kind {kind!r} is not one of {choices}")
    weights = meta.get("weights")
    if weights is not None and not Path(weights).is_absolute():
        weights = str(folder / weights)
    known = {"token", "class_word", "live", "reference_image", "weights", "weights_kind"}
    return Concept(
        name=folder.name,
        folder=folder,
        token=meta["token"],
        class_word=meta["class_word"],
        live=bool(meta.get("live", False)),
        images=tuple(images),
        reference_image=reference,
        weights=weights,
        weights_kind=kind,
        extra={k: v for k, v in meta.items() if k not in known},
    )


def load_concepts(paths: list[str | Path]) -> list[Concept]:
    """Each path is a concept folder, or a folder of concept folders (those with a metadata file)."""
    concepts: list[Concept] = []
    for path in map(Path, paths):
        if (path / METADATA_FILE).is_file() or not path.is_dir():
            concepts.append(load_concept(path))
            continue
        found = sorted(p for p in path.iterdir() if (p / METADATA_FILE).is_file())
        if not found:
            raise LayoutRetouchError(
                f"{str(path)!r} is neither a concept folder nor a folder of them (no {METADATA_FILE} found)"
            )
        concepts.extend(load_concept(p) for p in found)
    names = [c.name for c in concepts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise LayoutRetouchError(f"concept names must be unique, repeated: {', '.join(duplicates)}")
    return concepts


def write_concept_metadata(folder: str | Path, token: str, class_word: str, live: bool, **extra) -> Path:
    """Write `concept.json` (the helper for building a dataset by script)."""
    path = Path(folder) / METADATA_FILE
    meta = {"token": token, "class_word": class_word, "live": live, **extra}
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path
