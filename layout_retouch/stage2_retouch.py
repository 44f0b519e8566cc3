"""Stage 2: retouch. Reference, layout and target denoise in lockstep; the target borrows from both.

The reference replays its DDIM inversion and the layout replays Stage 1's trajectory, so neither
drifts; only the target takes its own DDIM steps. What it borrows, where and when, is the
attention controller's business (attention_control.py); the adaptive mask's (masks.py) is where.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from layout_retouch.attention_control import INVERSION, LAYOUT, REFERENCE, TARGET, AttentionController
from layout_retouch.config import LayoutRetouchConfig
from layout_retouch.inversion import DDIMInversion, InversionTrajectory
from layout_retouch.masks import AdaptiveMask, adaptive_mask, resize_mask, threshold_map
from layout_retouch.models import ModelPair
from layout_retouch.progress import Progress, track
from layout_retouch.sampling import Conditioning, PathInput, guided_eps
from layout_retouch.stage1_layout import LayoutTrajectory, layout_conditioning


@dataclass
class RetouchConditioning:
    vanilla: Conditioning | None  # P_v on the vanilla model (None where no step runs it: T_l = 0)
    personalized: Conditioning  # P_p on the personalized model
    neutral: Conditioning | None  # P_n on the personalized model (None without a reference)


@dataclass
class MaskBuilder:
    """Builds M each step from the target's subject map and the (fixed) segmenter mask M_sam."""

    sam_masks: np.ndarray  # (n, H_lat, W_lat) bool
    config: LayoutRetouchConfig
    latent_size: tuple[int, int]
    last: list[AdaptiveMask] = field(default_factory=list)
    history: list[torch.Tensor] = field(default_factory=list)

    def __call__(self, controller: AttentionController) -> torch.Tensor:
        subject = controller.subject_map(TARGET)
        n = len(self.sam_masks)
        if subject is None:  # no map yet: blend nothing away
            return torch.ones(n, *self.latent_size)
        m_ca = threshold_map(resize_mask(subject, self.latent_size), self.config.tau).cpu().numpy()
        self.last = [adaptive_mask(m_ca[i], self.sam_masks[i], self.config.min_component_area)
                     for i in range(n)]
        final = torch.from_numpy(np.stack([m.final for m in self.last]))
        self.history.append(final)
        return final


@torch.no_grad()
def retouch(
    pair: ModelPair,
    config: LayoutRetouchConfig,
    controller: AttentionController,
    conditioning: RetouchConditioning,
    target_latents: torch.Tensor,
    timesteps: torch.Tensor,
    layout: LayoutTrajectory | None,
    reference: InversionTrajectory | None,
    progress: Progress = True,
    reference_from: int = 0,
    inversion: DDIMInversion | None = None,
) -> torch.Tensor:
    """Denoise the target with the reference and layout paths beside it; return its clean latent.

    Without a layout path (ablation III) the target itself follows Stage 1's model schedule. A source
    whose tensors the controller already holds (`controller.features`, source_features.py) is not run;
    the reference path runs from step `reference_from` on (earlier steps do not borrow from it).
    `inversion`: the reference's inversion still under way (`reference.latents` reads it), whose steps
    ride in these calls, a row with its own timestep, as they do in Stage 1's.
    """
    scheduler = pair.scheduler
    vanilla_steps = config.num_vanilla_steps
    latents = target_latents
    unguided = None if inversion is None else Conditioning(inversion.embedding, None, [], inversion.added)
    for k, t in enumerate(track(timesteps, "stage 2 retouch", progress)):
        controller.begin_step(k)
        paths = []
        if reference is not None and REFERENCE not in controller.features and k >= reference_from:
            paths.append(PathInput(REFERENCE, reference.latents[k], True, conditioning.neutral))
        layout_model, layout_cond = layout_conditioning(k, vanilla_steps, conditioning.vanilla,
                                                        conditioning.personalized)
        if layout is not None and LAYOUT not in controller.features:
            paths.append(PathInput(LAYOUT, layout.latents[k], layout_model, layout_cond))
        if layout is None or config.target_prompt == "layout":
            model, cond = layout_model, layout_cond
        else:
            model = True
            cond = conditioning.neutral if config.target_prompt == "neutral" else conditioning.personalized
        paths.append(PathInput(TARGET, latents, model, cond, wants_eps=True))
        if inversion is not None and not inversion.done:
            paths.append(PathInput(INVERSION, inversion.latent, True, unguided, wants_eps=True, guided=False,
                                   timestep=inversion.timestep))
        eps = guided_eps(pair, paths, t, config.guidance_scale, controller)
        if INVERSION in eps:
            inversion.advance(eps[INVERSION])
        latents = scheduler.step(eps[TARGET], t, latents, eta=config.eta).prev_sample
    controller.finish_step()
    return latents
