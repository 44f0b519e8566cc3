"""Write the `sks star` reference photos (what a user would hand to DreamBooth) as PNG files.

  python -m layout_retouch.toyworld.references [--out DIR] [--count 5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layout_retouch.toyworld.datasets import reference_sample

REFERENCE_DIR = Path(__file__).parent / "models" / "references"
REFERENCE_COUNT = 5
REFERENCE_SEEDS = tuple(range(REFERENCE_COUNT))


def write_references(out: Path = REFERENCE_DIR, seeds=REFERENCE_SEEDS) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        path = out / f"sks_star_{seed:02d}.png"
        reference_sample(seed).pil().save(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REFERENCE_DIR)
    parser.add_argument("--count", type=int, default=REFERENCE_COUNT)
    args = parser.parse_args(argv)
    for path in write_references(args.out, range(args.count)):
        print(path)


if __name__ == "__main__":
    main()
