"""DreamMatcher (Nam et al., CVPR 2024) on plain personalized sampling.

The reference photo, DDIM-inverted, replays its trajectory beside the target (prompt P_n, "a photo of a
sks dog", as DreamMatcher's "a photo of a sks <class>"); the target (prompt P_p) denoises from the seed's
noise. From `start_step` on, the target's decoder self-attention reads the reference's values warped onto it
by semantic matching (matching_attention.py), inside the semantic-consistent mask. Sampling guidance pulls
the target's predicted clean latent towards the reference's latent warped the same way, on that mask.

Sources: "paper" is arXiv 2402.09812; "code" is the authors' repository (cvlab-kaist/DreamMatcher:
run_dreammatcher.py's params, dreammatcher/dreammatcher.py, dreammatcher/diffuser_utils.py).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from layout_retouch.baselines.config import baseline_config
from layout_retouch.baselines.matching import warp
from layout_retouch.baselines.matching_attention import MatchingControl
from layout_retouch.errors import LayoutRetouchError
from layout_retouch.inversion import load_reference_image
from layout_retouch.stage1_layout import step_blended_denoise


@dataclass(frozen=True)
class DreamMatcherConfig:
    """DreamMatcher's hyperparameters, with the code's names and values (run_dreammatcher.py's `params`)."""

    start_step: int = 4  # first step of matching attention (code initial_step: 4 of 50)
    end_step: int | None = None  # matching stops before this step (code cut_step: 50 = the last); None: the end
    # Decoder self-attention layers at or above this fraction of the latent resolution (code initial_layer 10,
    # cut_layer 16: SD 1.x's blocks 10-15, the 1/2 and 1/1 decoder layers; the same rule as our L_ref).
    min_resolution: float = 0.5
    # A match is trusted where its cycle error is below this x the layer's side x the subject's share of the
    # image (code cc_thres: 0.4; "a larger threshold injects more reference appearance").
    cycle_threshold: float = 0.4
    foreground_mask: bool = True  # match on the target's subject only (code fg_mask: True)
    key_replace: bool = False  # also warp the reference's keys (code key_replace: False; the paper's AMA: values)
    feature_dims: int = 256  # PCA dimensions per decoder feature scale (code co_pca: [256, 256])
    # Sampling guidance (paper Sec. 3.4; code matching_guidance). Its weight: code mg_grad_weight 50. The
    # code's run script switches it off (matching_guidance: False); the paper's full method has it: on here.
    guidance_weight: float = 50.0
    guidance_start_step: int = 4  # code mg_initial_step: 4
    guidance_end_step: int | None = None  # code mg_cut_step: 50 = the last; None: the end
    guidance_cycle_threshold: float = 0.4  # code mg_cc_thres: 0.4 ("same as cc_thres")

    def matching_at(self, step: int) -> bool:
        return step >= self.start_step and (self.end_step is None or step < self.end_step)

    def guidance_at(self, step: int) -> bool:
        return self.guidance_weight != 0 and step >= self.guidance_start_step and (
            self.guidance_end_step is None or step < self.guidance_end_step)

    def off(self, steps: int) -> bool:
        """No step matches or guides: the run is plain personalized sampling."""
        return not any(self.matching_at(k) or self.guidance_at(k) for k in range(steps))


def sample(pipe, config, cond, latents: torch.Tensor, timesteps: torch.Tensor, reference_image=None,
           size: tuple[int, int] | None = None, **_) -> torch.Tensor:
    """DreamMatcher's sampling of the target beside the reference's replayed inversion; the clean latent."""
    settings = baseline_config(DreamMatcherConfig, "dreammatcher", config)
    models = pipe.models
    if settings.off(len(timesteps)):  # nothing borrowed: row I's loop, exactly
        return step_blended_denoise(models, latents, timesteps, 0, cond.vanilla, cond.personalized,
                                    config.guidance_scale, config.eta, progress=pipe.progress).latents[-1]
    if reference_image is None:
        raise LayoutRetouchError("DreamMatcher borrows the subject's appearance from a reference photo: pass "
                                 "reference_image (CLI: --reference)")
    reference = pipe.invert_reference(load_reference_image(reference_image, size), timesteps, config)
    unet, _ = models.select(True)
    n = latents.shape[0]
    control = MatchingControl(unet, settings, config.mask_attention_resolution, tuple(latents.shape[-2:]), n,
                              cond.personalized.tokens)
    embeds = torch.cat([cond.neutral.uncond, cond.neutral.cond, cond.personalized.uncond.expand(n, -1, -1),
                        cond.personalized.cond.expand(n, -1, -1)])
    saved = dict(unet.attn_processors)
    with ExitStack() as stack:
        hooks = [block.register_forward_hook(lambda _m, _i, out: control.collect(out)) for block in unet.up_blocks]
        stack.callback(lambda: [h.remove() for h in hooks])
        unet.set_attn_processor(control.processors(unet))
        stack.callback(unet.set_attn_processor, saved)
        for k, t in enumerate(tqdm(timesteps, desc="dreammatcher", disable=not pipe.progress, leave=False)):
            control.begin_step(k, settings.matching_at(k) and bool(control.features))
            eps = target_eps(unet, control, settings, config.guidance_scale, models.scheduler, t, reference, k,
                             latents, embeds)
            latents = models.scheduler.step(eps, t, latents, eta=config.eta).prev_sample
    return latents


def target_eps(unet, control: MatchingControl, settings: DreamMatcherConfig, guidance_scale: float, scheduler, t,
               reference, step: int, latents: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """One UNet call of reference and targets; the targets' guided noise, with sampling guidance where it is on."""
    guide = settings.guidance_at(step)
    halves = [latents.detach().requires_grad_(guide) for _ in range(2)]
    with torch.set_grad_enabled(guide):
        ref = reference.latents[step]
        noise = unet(torch.cat([ref, ref, *halves]), t, encoder_hidden_states=embeds).sample
        control.end_call()
        uncond, cond = noise[control.target_rows(0)], noise[control.target_rows(1)]
        if guide:
            grads = guidance_gradients(control, settings, scheduler, t, halves, (uncond, cond), reference.latents[-1])
            beta = (1 - scheduler.alphas_cumprod[int(t)]) ** 0.5
            uncond, cond = (e - settings.guidance_weight * beta * g for e, g in zip((uncond, cond), grads, strict=True))
    uncond, cond = uncond.detach(), cond.detach()
    return uncond + guidance_scale * (cond - uncond)


def guidance_gradients(control: MatchingControl, settings: DreamMatcherConfig, scheduler, t, inputs, noise,
                       reference_latent: torch.Tensor) -> list[torch.Tensor]:
    """Gradient, per CFG half's input, of the masked squared distance between the target's predicted clean
    latent and the reference's clean latent warped onto it (paper Sec. 3.4; code obtain_grad_for_mg)."""
    alpha = scheduler.alphas_cumprod[int(t)].to(inputs[0].device)
    size = tuple(inputs[0].shape[-2:])
    loss, count = 0.0, torch.zeros(())
    for half, (x, eps) in enumerate(zip(inputs, noise, strict=True)):
        flow, mask = control.matches(half, size, settings.guidance_cycle_threshold)
        pred_x0 = (x - (1 - alpha) ** 0.5 * eps) / alpha**0.5
        c = x.shape[1]
        warped = warp(reference_latent[0].flatten(1).T, flow).transpose(1, 2)  # (n, C, hw)
        mask = mask.to(x.dtype)[:, None]  # (n, 1, hw)
        loss = loss + ((warped - pred_x0.flatten(2)) ** 2 * mask).sum()
        count = count + mask.sum() * c
    grads = torch.autograd.grad(loss / count.clamp_min(1), inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True)]
