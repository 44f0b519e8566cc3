"""MagicFusion (Zhao et al., ICCV 2023): saliency-aware noise blending (SNB) of two models' predictions.

Here the two models are the vanilla one on P_v (the paper's "general" model: scenes, layouts) and the
personalized one on P_p (its "expert": the subject). At each blended step, each model's classifier-free
guidance term says where that model is confident (paper Sec. 3: the guidance response follows the image's
saliency); after smoothing and a spatial softmax, each latent pixel takes the noise of the model whose
saliency is larger there (paper Eq. 4).

Sources: "paper" is arXiv 2303.13126; "code" is the authors' repository (MagicFusion/MagicFusion.github.io:
ldm/models/diffusion/ddim.py, scripts/stable_txt2img.py, README.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from layout_retouch.baselines.config import baseline_config
from layout_retouch.sampling import Conditioning, PathInput, guided_eps


@dataclass(frozen=True)
class MagicFusionConfig:
    """SNB's hyperparameters; the names of the code's `fusion_selection="t,k_g,k_e"` and `merge_mode`."""

    # SNB blends at DDPM timesteps t <= this (code: fusion_selection's first value; README's merge_mode 1
    # example uses 850: "in the first 1000-850 steps ... exclusively use [one] model's noise to establish the
    # basic composition"). -1: never blend.
    fusion_start_timestep: int = 850
    # The model that denoises alone at t > fusion_start_timestep (code merge_mode 1, which the README says its
    # applications, recontextualization included, used: the general model, here the vanilla one).
    before: Literal["vanilla", "personalized"] = "vanilla"
    k_vanilla: float = 1.0  # k_g of paper Eq. 4: the general model's saliency softmax scale (code: 1)
    k_personalized: float = 1.0  # k_e of paper Eq. 4: the expert's (code: 1)
    # Saliency smoothing: a box filter of this side, stride 1, then resized back to the latent (code: AvgPool2d(4,
    # padding=1, stride=1) then Resize(64)).
    smoothing_kernel: int = 4

    def __post_init__(self) -> None:
        if self.before not in ("vanilla", "personalized"):
            raise ValueError(f"before must be 'vanilla' or 'personalized', got {self.before!r}")
        if self.smoothing_kernel < 1:
            raise ValueError("smoothing_kernel must be at least 1")


def saliency(guidance: torch.Tensor, scale: float, kernel: int) -> torch.Tensor:
    """(n, C, h, w) guidance term -> (n, h, w) saliency: |.|, box-smoothed, channel mean, spatial softmax(scale * .)."""
    n, _, h, w = guidance.shape
    s = guidance.abs().float()
    if kernel > 1:
        s = F.avg_pool2d(s, kernel, stride=1, padding=(kernel - 1) // 2)
        s = F.interpolate(s, size=(h, w), mode="bilinear", align_corners=False)
    s = s.mean(1)
    return torch.softmax(scale * s.reshape(n, h * w), dim=1).reshape(n, h, w)


def fusion_mask(vanilla_guidance: torch.Tensor, personal_guidance: torch.Tensor,
                config: MagicFusionConfig) -> torch.Tensor:
    """(n, 1, h, w) bool: where the personalized model's saliency beats the vanilla one's (ties: vanilla, as
    the code's argmax over [general, expert] takes the first)."""
    general = saliency(vanilla_guidance, config.k_vanilla, config.smoothing_kernel)
    expert = saliency(personal_guidance, config.k_personalized, config.smoothing_kernel)
    return (expert > general)[:, None]


def blend(vanilla: tuple[torch.Tensor, torch.Tensor], personal: tuple[torch.Tensor, torch.Tensor],
          guidance_scale: float, config: MagicFusionConfig) -> torch.Tensor:
    """SNB of two models' (unconditional, conditional) noise: each pixel takes the guided noise of the more
    salient model. A model's saliency is its own guidance term w (c - u) (paper Eq. 3; the code takes both terms
    against the general model's unconditional noise)."""
    (vu, vc), (pu, pc) = vanilla, personal
    guide_v, guide_p = guidance_scale * (vc - vu), guidance_scale * (pc - pu)
    mask = fusion_mask(guide_v, guide_p, config)
    return torch.where(mask, pu + guide_p, vu + guide_v)


def _halves(role: str, latents: torch.Tensor, personalized: bool, cond: Conditioning) -> list[PathInput]:
    """A model's unconditional and conditional rows as two unguided paths, whose raw noise comes back."""
    return [PathInput(f"{role}-{half}", latents, personalized, Conditioning(emb, None, []), wants_eps=True,
                      guided=False) for half, emb in (("uncond", cond.uncond), ("cond", cond.cond))]


@torch.no_grad()
def sample(pipe, config, cond, latents: torch.Tensor, timesteps: torch.Tensor, **_) -> torch.Tensor:
    """DDIM with SNB at t <= fusion_start_timestep and one model alone before; the clean latent."""
    settings = baseline_config(MagicFusionConfig, "magicfusion", config)
    models, scheduler, w = pipe.models, pipe.models.scheduler, config.guidance_scale
    for t in tqdm(timesteps, desc="magicfusion", disable=not pipe.progress, leave=False):
        if int(t) > settings.fusion_start_timestep:  # one model alone: exactly its plain sampling step
            personalized = settings.before == "personalized"
            path_cond = cond.personalized if personalized else cond.vanilla
            eps = guided_eps(models, [PathInput("alone", latents, personalized, path_cond, wants_eps=True)], t, w)
            eps = eps["alone"]
        else:
            raw = guided_eps(models, _halves("vanilla", latents, False, cond.vanilla)
                             + _halves("personal", latents, True, cond.personalized), t, w)
            eps = blend((raw["vanilla-uncond"], raw["vanilla-cond"]), (raw["personal-uncond"], raw["personal-cond"]),
                        w, settings)
        latents = scheduler.step(eps, t, latents, eta=config.eta).prev_sample
    return latents
