"""Per-image oracle records and their summaries with bootstrap confidence intervals over seeds.

An image's record is what the benchmark keeps of it (so a resumed run needs no pixels): the seed,
the subject's center, the identity probability and one boolean per thing its prompt asks for. A
summary resamples seeds (the same resample for every prompt, since every prompt runs the same
seeds) and reports each measure's point value and percentile interval.
"""

from __future__ import annotations

import numpy as np

from layout_retouch.toyworld.measures import checks, layout_diversity
from layout_retouch.toyworld.oracles import Reading
from layout_retouch.toyworld.scene import parse_caption

# The requests that make prompt fidelity: the context a personalized model tends to lose. The class
# check is left out (it is part of the subject's identity), and a hat counts as one request: it is
# followed when a hat is seen, whatever its color (its color is reported on its own).
FIDELITY_KEYS = ("scene", "size", "accessory", "occluder", "position")
# An image shows its subject when the locator sees at least this many subject pixels: the smallest
# subject the renderer draws (a small star, radius 5.5 px) covers about 35, a fence hides up to half.
MIN_SUBJECT_PIXELS = 10
BOOTSTRAP_SAMPLES = 2000  # resamples of the seeds for each interval
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0  # fixed, so the same records always give the same intervals


def image_record(seed: int, reading: Reading, scoring_text: str) -> dict:
    """What the benchmark keeps of one image: JSON-ready, enough for every measure."""
    result = checks(parse_caption(scoring_text), reading)
    asked = [ok for key, ok in result.items() if key in FIDELITY_KEYS]
    return {
        "seed": int(seed),
        "center": [round(reading.center[0], 3), round(reading.center[1], 3)],
        "size": round(reading.size, 3),
        "subject_pixels": int(reading.mask.sum()),
        "identity": round(reading.identity, 5),
        "checks": result,
        "fidelity": float(np.mean(asked)) if asked else None,
    }


def center_spread(centers: np.ndarray) -> np.ndarray:
    """sqrt(var_x + var_y) over the seed axis (-2) of (..., seeds, 2) centers: `layout_diversity`'s std."""
    return np.sqrt(centers.var(axis=-2).sum(axis=-1))


def percentile_interval(point: float, samples: np.ndarray) -> dict:
    """`point` with the CONFIDENCE percentile interval of its bootstrap `samples` (NaN samples ignored)."""
    tail = (1 - CONFIDENCE) / 2 * 100
    lo, hi = np.nanpercentile(samples, [tail, 100 - tail])
    return {"mean": round(float(point), 4), "ci_low": round(float(lo), 4), "ci_high": round(float(hi), 4)}


def summarize(groups: dict[str, list[dict]], position_free: set[str] | None = None) -> dict:
    """Measures over prompts (`groups`: prompt -> its records, one per seed) with 95% intervals.

    prompt_fidelity: mean share of each image's requests it follows; identity: mean identity
    probability; diversity: center spread across seeds within a prompt, averaged over the prompts
    in `position_free` (default: all), since a position phrase pins the subject on purpose.
    """
    prompts = list(groups)
    if not prompts:
        raise ValueError("no records to summarize")
    seeds = [r["seed"] for r in groups[prompts[0]]]
    for prompt in prompts:
        if [r["seed"] for r in groups[prompt]] != seeds:
            raise ValueError(f"prompt {prompt!r} has other seeds than {prompts[0]!r}; every prompt needs the same")
    fidelity = np.array([[np.nan if r["fidelity"] is None else r["fidelity"] for r in groups[p]] for p in prompts])
    identity = np.array([[r["identity"] for r in groups[p]] for p in prompts])
    centers = np.array([[r["center"] for r in groups[p]] for p in prompts], dtype=float)
    free = [i for i, p in enumerate(prompts) if position_free is None or p in position_free]

    rng = np.random.default_rng(BOOTSTRAP_SEED)
    resample = rng.integers(0, len(seeds), (BOOTSTRAP_SAMPLES, len(seeds)))  # (B, S) seed indices
    out = {
        "prompt_fidelity": percentile_interval(np.nanmean(fidelity), np.nanmean(fidelity[:, resample], axis=(0, 2))),
        "identity": percentile_interval(identity.mean(), identity[:, resample].mean(axis=(0, 2))),
    }
    visible = np.array([[r["subject_pixels"] >= MIN_SUBJECT_PIXELS for r in groups[p]] for p in prompts], float)
    out["subject_visible"] = percentile_interval(visible.mean(), visible[:, resample].mean(axis=(0, 2)))
    if free and len(seeds) > 1:
        spread = center_spread(centers[free])  # (P,)
        boot = center_spread(centers[free][:, resample]).mean(axis=0)  # (P, B) -> (B,)
        out["diversity"] = percentile_interval(spread.mean(), boot)
        out["diversity"]["grid_entropy_bits"] = round(float(np.mean(
            [layout_diversity(centers[i].tolist())["grid_entropy_bits"] for i in free])), 4)
    else:
        out["diversity"] = None
    out.update(attribute_rates([r for p in prompts for r in groups[p]]))
    out["n_prompts"], out["n_seeds"], out["n_images"] = len(prompts), len(seeds), len(prompts) * len(seeds)
    return out


def attribute_rates(records: list[dict]) -> dict:
    """Per asked-for attribute, the share of images that follow it; and the share that follow all
    their context requests (scene, accessory, occluder, position) at once (`measures`' "context")."""
    per_key: dict[str, list[bool]] = {}
    context = []
    for r in records:
        for key, ok in r["checks"].items():
            per_key.setdefault(key, []).append(ok)
        asked = [ok for key, ok in r["checks"].items() if key in ("scene", "accessory", "occluder", "position")]
        if asked:
            context.append(all(asked))
    return {
        "attributes": {k: {"rate": round(float(np.mean(v)), 4), "n": len(v)} for k, v in sorted(per_key.items())},
        "context_all": round(float(np.mean(context)), 4) if context else None,
    }
