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
from layout_retouch.progress import Progress, StepReport
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
        subject = controller.subject_map(TARGET, complete=True)
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
    return Retouch(pair, config, controller, conditioning, target_latents, timesteps, layout, reference,
                   progress, reference_from, inversion).run()


class Retouch:
    """Stage 2 one step at a time (`retouch` runs it all): its steps take calls of their own (`run`), or ride in
    Stage 1's calls where they can (`ride`, offered by `step_blended_denoise`; `config.pipeline_stages`).

    A step can ride in Stage 1's call of step k when the layout step it borrows from is done (it is one of the
    steps before k, recorded by Stage 1 or replayed from its trajectory), it needs no mask (the adaptive mask
    reads the final layout image: steps before S_mask only), every path it runs uses the call's model, and the
    reference latent it reads is already inverted. It then takes its own timestep in that call.
    `layout`: Stage 1's trajectory, or None while Stage 1 runs (`uses_layout` says whether there will be one).
    """

    def __init__(self, pair: ModelPair, config: LayoutRetouchConfig, controller: AttentionController,
                 conditioning: RetouchConditioning, target_latents: torch.Tensor, timesteps: torch.Tensor,
                 layout: LayoutTrajectory | None, reference: InversionTrajectory | None, progress: Progress = True,
                 reference_from: int = 0, inversion: DDIMInversion | None = None, uses_layout: bool | None = None):
        self.pair, self.config, self.controller, self.conditioning = pair, config, controller, conditioning
        self.latents, self.timesteps, self.layout, self.reference = target_latents, timesteps, layout, reference
        self.reference_from, self.inversion = reference_from, inversion
        self.uses_layout = layout is not None if uses_layout is None else uses_layout
        self.unguided = None if inversion is None else Conditioning(inversion.embedding, None, [], inversion.added)
        # the target's first step: 0, or T_l where it starts from the layout's latent (config.target_start)
        self.start = config.target_start_step if self.uses_layout else 0
        self.step = self.start  # the next step to take
        self.rode = 0  # how many steps rode in Stage 1's calls
        self.report = StepReport("stage 2 retouch", len(timesteps) - self.start, progress)
        plan = controller.plan
        # the first step that reads the adaptive mask (set after Stage 1: it needs the final layout image)
        blends = plan.mask_start is not None and plan.blend_layers
        self.ride_until = min(plan.mask_start, len(timesteps)) if blends else len(timesteps)

    @property
    def done(self) -> bool:
        return self.step >= len(self.timesteps)

    def paths(self, k: int, layout_latents=None, timestep: torch.Tensor | None = None) -> list[PathInput]:
        """The paths of step k but the inversion's: the sources the controller does not hold, and the target."""
        config, conditioning, controller = self.config, self.conditioning, self.controller
        paths = []
        if self.reference is not None and REFERENCE not in controller.features and k >= self.reference_from:
            paths.append(PathInput(REFERENCE, self.reference.latents[k], True, conditioning.neutral,
                                   timestep=timestep))
        layout_model, layout_cond = layout_conditioning(k, config.num_vanilla_steps, conditioning.vanilla,
                                                        conditioning.personalized)
        if self.uses_layout and LAYOUT not in controller.features:
            latents = (self.layout.latents if layout_latents is None else layout_latents)[k]
            paths.append(PathInput(LAYOUT, latents, layout_model, layout_cond, timestep=timestep))
        if not self.uses_layout or config.target_prompt == "layout":
            model, cond = layout_model, layout_cond
        else:
            model = True
            cond = conditioning.neutral if config.target_prompt == "neutral" else conditioning.personalized
        paths.append(PathInput(TARGET, self.latents, model, cond, wants_eps=True, timestep=timestep))
        return paths

    def ride(self, call_step: int, personalized: bool, layout_latents: list[torch.Tensor]
             ) -> tuple[list[PathInput], AttentionController] | None:
        """The next step's paths and controller, to ride in Stage 1's call of step `call_step` on the
        (`personalized` or vanilla) model, where it can (see the class); None where it cannot."""
        k = self.step
        if self.done or k >= self.ride_until or k >= call_step or not self.uses_layout:
            return None
        reference = self.reference
        if reference is not None and REFERENCE not in self.controller.features and k >= self.reference_from:
            ready = getattr(reference.latents, "ready", None)
            if ready is not None and not ready(k):  # an inversion under way that has not got there yet
                return None
        self._begin_from(layout_latents)  # Stage 1 has made the layout's latent of step k by now
        paths = self.paths(k, layout_latents, self.timesteps[k])
        if not self.pair.one_unet and any(bool(p.personalized) is not bool(personalized) for p in paths):
            return None
        self.report.start()
        self.controller.begin_step(k)
        self.rode += 1
        return paths, self.controller

    def _begin_from(self, layout_latents) -> None:
        """Before the target's first step, where it starts from the layout (config.target_start): the layout's latent
        of that step (its clean one at T_l = T)."""
        if self.step == self.start > 0:
            self.latents = layout_latents[self.start].clone()

    def take(self, eps: dict[str, torch.Tensor]) -> None:
        """Finish the step with the target's noise (from a call of its own or one it rode in)."""
        t = self.timesteps[self.step]
        self.latents = self.pair.scheduler.step(eps[TARGET], t, self.latents, eta=self.config.eta).prev_sample
        self.step += 1
        self.report.advance()

    def step_alone(self) -> None:
        """The next step in calls of its own (one per model), with the inversion's next step riding along."""
        k, inversion = self.step, self.inversion
        self.report.start()
        self.controller.begin_step(k)
        paths = self.paths(k)
        if inversion is not None and not inversion.done:
            paths.append(PathInput(INVERSION, inversion.latent, True, self.unguided, wants_eps=True, guided=False,
                                   timestep=inversion.timestep))
        eps = guided_eps(self.pair, paths, self.timesteps[k], self.config.guidance_scale, self.controller)
        if INVERSION in eps:
            inversion.advance(eps[INVERSION])
        self.take(eps)

    def run(self) -> torch.Tensor:
        """The steps left, each in calls of its own; the target's clean latent."""
        self._begin_from(self.layout.latents if self.layout is not None else None)
        while not self.done:
            self.step_alone()
        self.controller.finish_step()
        return self.latents
