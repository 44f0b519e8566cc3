"""FreeU (Si et al., CVPR 2024) on plain personalized sampling, through diffusers' `enable_freeu`.

FreeU re-weighs the decoder: it amplifies the backbone features (b1, b2) and damps the low frequencies
of the skip connections (s1, s2) of the first two up stages. It needs no reference and no second model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from layout_retouch.baselines.config import baseline_config
from layout_retouch.stage1_layout import step_blended_denoise


@dataclass(frozen=True)
class FreeUConfig:
    """The FreeU authors' values for SD 1.4 (github.com/ChenyangSi/FreeU README), the paper's base model."""

    b1: float = 1.3  # backbone factor, first up stage (FreeU README, SD 1.4; SD 1.5: 1.5)
    b2: float = 1.4  # backbone factor, second up stage (FreeU README, SD 1.4; SD 1.5: 1.6)
    s1: float = 0.9  # skip factor, first up stage (FreeU README, SD 1.4 and 1.5)
    s2: float = 0.2  # skip factor, second up stage (FreeU README, SD 1.4 and 1.5)

    @property
    def is_identity(self) -> bool:
        """All factors 1: FreeU changes nothing, so it is not installed (its FFT round trip would only add rounding)."""
        return (self.b1, self.b2, self.s1, self.s2) == (1.0, 1.0, 1.0, 1.0)


# The same authors' values for SD 1.5 checkpoints: pass as LayoutRetouchConfig(baselines={"freeu": FREEU_SD15}).
FREEU_SD15 = dict(b1=1.5, b2=1.6, s1=0.9, s2=0.2)


@contextmanager
def freeu(unet, config: FreeUConfig) -> Iterator[None]:
    """FreeU on `unet` for the duration of a run; the UNet is left as it was found."""
    if config.is_identity:
        yield
        return
    unet.enable_freeu(**asdict(config))
    try:
        yield
    finally:
        unet.disable_freeu()


@torch.no_grad()
def sample(pipe, config, cond, latents: torch.Tensor, timesteps: torch.Tensor, **_) -> torch.Tensor:
    """Plain personalized sampling (row I's loop) with FreeU on the personalized UNet; the clean latent."""
    models = pipe.models
    unet, _ = models.select(True)
    with freeu(unet, baseline_config(FreeUConfig, "freeu", config)):
        trajectory = step_blended_denoise(models, latents, timesteps, 0, cond.vanilla, cond.personalized,
                                          config.guidance_scale, config.eta, progress=pipe.progress)
    return trajectory.latents[-1]
