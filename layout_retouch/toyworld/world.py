"""The toy world's definition as the method sees it: where its models lie, its subject, its settings.

The CLI (demo, toy-bench, toy-probes, serve) and the toy world's own benchmarks read it from here;
nothing in the method imports it.
"""

from __future__ import annotations

from pathlib import Path

from layout_retouch.errors import LayoutRetouchError
from layout_retouch.toyworld.scene import PERSONAL_CLASS, PERSONAL_TOKEN

TOY_MODELS = Path(__file__).resolve().parent / "models"
TOKEN, CLASS_WORD = PERSONAL_TOKEN, PERSONAL_CLASS
VANILLA, DREAMBOOTH, REFERENCES, ORACLES = "vanilla", "sks_star_dreambooth", "references", "oracles"
REFERENCE_NAME = "sks_star_00.png"  # the reference photo Stage 2 borrows appearance from
# The toy UNet (v2, toyworld/README.md) has cross-attention at 1/1, 1/2 and 1/4 of its 16x16 latent; the
# paper's 1/4 (4x4) is too coarse for a mask, so the toy world reads the 8x8 maps (ALGORITHM.md allows 1/2
# for small UNets). Its segmenter is the toy world's oracle, plugged in where SAM would be. Everything else
# is the paper's default.
TOY_METHOD = dict(segmenter="toy", mask_attention_resolution=0.5)
# The settings this world's measurements pick (docs/RESULTS.md), which the demo runs unless asked for the paper's:
# T_l = 20 of 50, the T_l sweep's pick by a rule set before the benchmark ran on it (the highest V prompt fidelity
# whose identity stays at least row II's at the paper's T_l), and the target started from the layout's latent after
# the vanilla steps (`target_start`), since the layout's queries and keys cannot move a toy DreamBooth's subject
# (toy-probes P1b): the paper's early swap cannot give the target the layout's structure in this world.
TOY_SETTINGS = dict(vanilla_steps=0.4, target_start="layout")
# By name, for the commands' --settings: the world's, or the paper's defaults (no change to the config).
SETTINGS = {"world": TOY_SETTINGS, "paper": {}}


def find_toy_models(personalized: str = DREAMBOOTH, models: Path = TOY_MODELS) -> tuple[Path, Path, Path]:
    """(vanilla folder, personalized model, reference photo) of a toy world's models folder."""
    base = models / VANILLA
    tuned = Path(personalized) if Path(personalized).exists() else models / personalized
    reference = models / REFERENCES / REFERENCE_NAME
    if not reference.exists():  # a second world's folder may hold models only: the photos are the world's
        reference = TOY_MODELS / REFERENCES / REFERENCE_NAME
    missing = [p for p in (base / "model_index.json", tuned, reference) if not p.exists()]
    if missing:
        raise LayoutRetouchError(
            f"the toy world's models are missing ({', '.join(map(str, missing))}); reinstall the package "
            "or see layout_retouch/toyworld/README.md for the commands that train them"
        )
    return base, tuned, reference
