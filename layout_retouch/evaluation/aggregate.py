"""From per-image records to the paper's numbers: average per prompt, then per concept, then report.

Per-image metrics (CLIP-I, DINO, CLIP-T, preference) are averaged over a prompt's images; group
metrics (Inception Score, center spread) are computed over those images; both are then averaged
over the prompts of a concept, and over the concepts of a method.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from layout_retouch.metrics.inception_score import DEFAULT_IS_SPLITS, inception_score
from layout_retouch.metrics.layout_diversity import center_spread

IMAGE_METRICS = ("clip_i", "dino", "clip_t", "preference")
GROUP_METRICS = ("inception_score", "center_spread")
METRICS = IMAGE_METRICS + GROUP_METRICS
PROMPT_KEYS = ("method", "personalization", "concept", "prompt_set", "prompt_index")
CONCEPT_KEYS = PROMPT_KEYS[:-1]
METHOD_KEYS = ("method", "personalization", "prompt_set")


@dataclass
class ImageResult:
    """One scored image: its identity (`info`) and its stored arrays."""

    info: dict
    arrays: dict[str, np.ndarray]

    def row(self) -> dict:
        row = dict(self.info)
        for name in IMAGE_METRICS:
            row[name] = float(self.arrays[name][0]) if name in self.arrays else float("nan")
        center = self.arrays.get("center")
        row["center_x"], row["center_y"] = (
            (float(center[0]), float(center[1]))
            if center is not None
            else (
                float("nan"),
                float("nan"),
            )
        )
        row["center_score"] = (
            float(self.arrays["center_score"][0]) if "center_score" in self.arrays else float("nan")
        )
        return row


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def per_prompt(results: Sequence[ImageResult], is_splits: int = DEFAULT_IS_SPLITS) -> list[dict]:
    groups: dict[tuple, list[ImageResult]] = defaultdict(list)
    for r in results:
        groups[tuple(r.info[k] for k in PROMPT_KEYS)].append(r)
    rows = []
    for key in sorted(groups):
        members = groups[key]
        row = dict(zip(PROMPT_KEYS, key, strict=True))
        row["template"] = members[0].info["template"]
        row["n_images"] = len(members)
        for name in IMAGE_METRICS:
            row[name] = _mean([m.row()[name] for m in members])
        probs = [m.arrays["is_probs"] for m in members if "is_probs" in m.arrays]
        ok = len(probs) == len(members) and len(probs) >= is_splits
        row["inception_score"] = inception_score(np.stack(probs), is_splits)[0] if ok else float("nan")
        centers = [m.arrays["center"] for m in members if "center" in m.arrays]
        row["center_spread"] = center_spread(np.stack(centers)) if centers else float("nan")
        rows.append(row)
    return rows


def average_over(rows: Sequence[dict], keys: Sequence[str], count_name: str) -> list[dict]:
    """Mean of every metric over the rows sharing `keys` (prompts within a concept, concepts...)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row)
    out = []
    for key in sorted(groups):
        members = groups[key]
        row = dict(zip(keys, key, strict=True))
        row[count_name] = len(members)
        row["n_images"] = sum(m["n_images"] for m in members)
        for name in METRICS:
            row[name] = _mean([m[name] for m in members])
        out.append(row)
    return out


def aggregate(results: Sequence[ImageResult], is_splits: int = DEFAULT_IS_SPLITS) -> dict[str, list[dict]]:
    """`images` (one row each), `prompts`, `concepts`, `methods` tables."""
    prompts = per_prompt(results, is_splits)
    concepts = average_over(prompts, CONCEPT_KEYS, "n_prompts")
    methods = average_over(concepts, METHOD_KEYS, "n_concepts")
    return {
        "images": [r.row() for r in results],
        "prompts": prompts,
        "concepts": concepts,
        "methods": methods,
    }
