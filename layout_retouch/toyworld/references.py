"""Write the `sks star` reference photos (what a user would hand to DreamBooth) as PNG files.

  python -m layout_retouch.toyworld.references [--out DIR] [--count 5] [--masks DIR] [--radius LO HI]

`--masks DIR` also writes the renderer's exact subject mask of each photo, under the photo's name
(white = subject), for `personalize --subject-masks DIR`; `--mask-dilate PX` grows it by PX pixels
(the subject's outline then counts whole in the latent grid, 4 px a cell). `--radius LO HI` draws the
subject at another size (the shipped photos: 15.5-18 px, large; 10-13 px is the renderer's medium).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image
from scipy import ndimage

from layout_retouch.toyworld.datasets import REFERENCE_RADIUS, reference_sample

REFERENCE_DIR = Path(__file__).parent / "models" / "references"
REFERENCE_COUNT = 5
REFERENCE_SEEDS = tuple(range(REFERENCE_COUNT))


def write_references(
    out: Path = REFERENCE_DIR, seeds=REFERENCE_SEEDS, masks: Path | None = None, mask_dilate: int = 0,
    radius: tuple[float, float] = REFERENCE_RADIUS,
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    if masks is not None:
        masks.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        name = f"sks_star_{seed:02d}.png"
        sample = reference_sample(seed, radius)
        sample.pil().save(out / name)
        if masks is not None:
            mask = ndimage.binary_dilation(sample.mask, iterations=mask_dilate) if mask_dilate else sample.mask
            Image.fromarray(mask.astype("uint8") * 255).save(masks / name)
        paths.append(out / name)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REFERENCE_DIR)
    parser.add_argument("--count", type=int, default=REFERENCE_COUNT)
    parser.add_argument("--masks", type=Path, help="also write each photo's exact subject mask here")
    parser.add_argument("--mask-dilate", type=int, default=0, help="grow the masks by this many pixels")
    parser.add_argument("--radius", type=float, nargs=2, metavar=("LO", "HI"), default=REFERENCE_RADIUS,
                        help="the subject's radius range in pixels (default: the shipped photos' %(default)s)")
    args = parser.parse_args(argv)
    if not 0 < args.radius[0] <= args.radius[1]:
        parser.error(f"--radius needs 0 < LO <= HI, got {args.radius[0]} {args.radius[1]}")
    for path in write_references(args.out, range(args.count), args.masks, args.mask_dilate, tuple(args.radius)):
        print(path)


if __name__ == "__main__":
    main()
