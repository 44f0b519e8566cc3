"""Paired differences of each row against rows I and V from this folder's per-prompt records.

Same seeds in every row, so a row's difference to I is taken image by image, then bootstrapped over
seeds (2000 resamples, the same seed resample for every prompt, generator seed 0), as the table's
intervals are. Run: `python docs/results/baselines_v1/paired.py`.
"""

import json
from pathlib import Path

import numpy as np

RUNS = Path(__file__).parent / "runs" / "dreambooth"
ROWS = ["I", "V", "freeu", "magicfusion", "dreammatcher"]


def load(row: str) -> dict[str, list[dict]]:
    runs = (json.loads(f.read_text()) for f in sorted((RUNS / row).glob("*.json")))
    return {run["template"]: run["records"] for run in runs}


def main() -> None:
    data = {row: load(row) for row in ROWS}
    prompts = sorted(data["I"])
    resample = np.random.default_rng(0).integers(0, 16, (2000, 16))
    for key in ("identity", "fidelity"):
        values = {row: np.array([[np.nan if r[key] is None else r[key] for r in data[row][p]] for p in prompts])
                  for row in ROWS}
        for ref in ("I", "V"):
            for row in ROWS:
                if row != ref:
                    diff = values[row] - values[ref]
                    lo, hi = np.percentile(np.nanmean(diff[:, resample], axis=(0, 2)), [2.5, 97.5])
                    print(f"{key:9s} {row:>13s} - {ref}: {np.nanmean(diff):+.3f} [{lo:+.3f}, {hi:+.3f}]")


if __name__ == "__main__":
    main()
