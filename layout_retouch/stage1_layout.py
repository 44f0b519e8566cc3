"""Stage 1: step-blended denoising. The vanilla model sets the layout, the personalized one takes over.

For the first `T_l` steps the vanilla model denoises P_v (no personal token): the coarse layout
comes from the base model's diversity. From step `T_l` on the personalized model denoises P_p.
The whole latent trajectory is kept: Stage 2 replays it as the layout path. The reference's DDIM
inversion, when it has to be computed, can ride in the same UNet calls (a timestep per batch row):
the personalized steps then cost one call for both (the steps left ride in Stage 2's calls). So can
Stage 2's first steps (those before S_mask, `LayoutRetouchConfig.pipeline_stages`), a step behind the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layout_retouch.attention_control import INVERSION, LAYOUT, AttentionController
from layout_retouch.inversion import DDIMInversion
from layout_retouch.models import ModelPair
from layout_retouch.progress import Progress, track
from layout_retouch.sampling import Conditioning, PathInput, shared_guided_eps


@dataclass
class LayoutTrajectory:
    latents: list[torch.Tensor]  # latents[k] is the input of step k; latents[-1] is the clean z_0
    timesteps: torch.Tensor
    vanilla_steps: int  # T_l


def layout_conditioning(step: int, vanilla_steps: int, vanilla: Conditioning,
                        personalized: Conditioning) -> tuple[bool, Conditioning]:
    """The model (personalized or not) and prompt that denoise step `step` of the layout."""
    return (False, vanilla) if step < vanilla_steps else (True, personalized)


@torch.no_grad()
def step_blended_denoise(
    pair: ModelPair,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    vanilla_steps: int,
    vanilla: Conditioning,
    personalized: Conditioning,
    guidance_scale: float,
    eta: float = 0.0,
    controller: AttentionController | None = None,
    progress: Progress = True,
    inversion: DDIMInversion | None = None,
    rider=None,
) -> LayoutTrajectory:
    """DDIM with CFG; steps k < vanilla_steps on the vanilla model and P_v, the rest personalized and P_p.

    `inversion` (on the personalized model) takes one of its steps beside each step of the layout on the
    same UNet; beside the vanilla model's steps (another UNet) it waits: Stage 2's calls carry the rest.
    `rider` (Stage 2 run step by step, `stage2_retouch.Retouch`) is offered each call: the step it may take
    there (one behind the layout step it borrows from at least, on the same model) rides in it, with its own
    controller, rows and timestep. Needs `controller`, whose processors serve both.
    """
    scheduler = pair.scheduler
    trajectory = [latents]
    unguided = Conditioning(inversion.embedding, None, [], inversion.added) if inversion is not None else None
    for k, t in enumerate(track(timesteps, "stage 1 layout", progress)):
        if controller is not None:
            controller.begin_step(k)
        model, cond = layout_conditioning(k, vanilla_steps, vanilla, personalized)
        paths = [PathInput(LAYOUT, latents, model, cond, wants_eps=True)]
        if inversion is not None and not inversion.done and (model or pair.one_unet):  # not a call of its own
            paths.append(PathInput(INVERSION, inversion.latent, True, unguided, wants_eps=True, guided=False,
                                   timestep=inversion.timestep))
        runs = [(paths, controller)]
        ride = rider.ride(k, model, trajectory) if rider is not None and controller is not None else None
        if ride is not None:
            runs.append(ride)
        eps, *rode = shared_guided_eps(pair, runs, t, guidance_scale)
        if rode:
            rider.take(rode[0])
        if INVERSION in eps:
            inversion.advance(eps[INVERSION])
        eps = eps[LAYOUT]
        latents = scheduler.step(eps, t, latents, eta=eta).prev_sample
        trajectory.append(latents)
    if controller is not None:
        controller.finish_step()
    return LayoutTrajectory(trajectory, timesteps, vanilla_steps)
