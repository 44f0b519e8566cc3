"""The paper's baselines (Tables 1-2) on the same models, seeds and prompts as rows I-V.

Each is a `--method` value (`freeu`, `magicfusion`, `dreammatcher`) and a module here with a `sample`
function and a config dataclass whose defaults name their sources; `LayoutRetouchConfig.baselines`
overrides them per run. `LayoutRetouchPipeline.__call__` hands a baseline method to `run_baseline`.
"""

from __future__ import annotations

import importlib

import torch

# method -> module under layout_retouch.baselines, imported when the method runs.
MODULES = {"freeu": "freeu", "magicfusion": "magicfusion", "dreammatcher": "dreammatcher"}


def run_baseline(pipe, config, cond, latents: torch.Tensor, timesteps: torch.Tensor, reference_image=None,
                 size: tuple[int, int] | None = None) -> torch.Tensor:
    """Denoise `latents` (the seed's noise, as row I gets it) with baseline `config.method`; the clean latent.

    `cond` holds P_v, P_p and P_n encoded by their models (RetouchConditioning); `reference_image` and `size`
    (pixels) serve the baselines that borrow from a reference photo.
    """
    module = importlib.import_module(f"layout_retouch.baselines.{MODULES[config.method]}")
    return module.sample(pipe, config, cond, latents, timesteps, reference_image=reference_image, size=size)
