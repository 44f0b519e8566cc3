"""Shared denoising pieces: the paths' conditioning (conditioning.py) and one guided UNet call for several paths.

Both stages run "paths" (reference, layout, target) through the vanilla or the personalized model.
Paths that use the same model at a step share one batched UNet call; paths that are sources of the
attention control run before the target, so the target always finds what it borrows.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from layout_retouch.attention_control import TARGET, AttentionController, PathRows, install_processors
from layout_retouch.conditioning import Conditioning, encode_text, unet_added_kwargs
from layout_retouch.models import ModelPair

__all__ = ["Conditioning", "PathInput", "attention_control", "encode_text", "guided_eps"]


@dataclass
class PathInput:
    role: str
    latents: torch.Tensor  # (n, C, h, w)
    personalized: bool  # which model runs it
    conditioning: Conditioning
    wants_eps: bool = False  # replayed paths (reference, layout) only lend their attention
    guided: bool = True  # False: conditional rows only, and the raw noise prediction back (an inversion)
    timestep: torch.Tensor | None = None  # its own timestep where it is not the call's (an inversion)

    def embeddings(self) -> list[torch.Tensor]:
        """Its text embeddings in batch order: unconditional half, then conditional (or conditional only)."""
        halves = (self.conditioning.uncond, self.conditioning.cond) if self.guided else (self.conditioning.cond,)
        return [c.expand(self.latents.shape[0], -1, -1) for c in halves]

    def added_conditions(self) -> list[dict[str, torch.Tensor] | None]:
        """Its added conditioning (SDXL's pooled text and time ids; None for SD), in the order of `embeddings`."""
        c = self.conditioning
        return [c.uncond_added, c.added] if self.guided else [c.added]


@torch.no_grad()
def guided_eps(pair: ModelPair, paths: list[PathInput], t, guidance_scale: float,
               controller: AttentionController | None = None) -> dict[str, torch.Tensor]:
    """Classifier-free-guided noise for the paths that want it, one UNet call per model."""
    if pair.one_unet:  # the models differ in their text only: one call
        groups = [paths]
    else:
        groups = [g for g in ([p for p in paths if not p.personalized], [p for p in paths if p.personalized]) if g]
    groups.sort(key=lambda g: any(p.role == TARGET for p in g))  # sources first
    result = {}
    for group in groups:
        unet, _ = pair.select(group[0].personalized)
        rows, offset = [], 0
        per_path = [p.embeddings() for p in group]
        for p, halves in zip(group, per_path, strict=True):  # each path's unconditional half, then its conditional
            rows.append(PathRows(p.role, offset, offset + len(halves) * p.latents.shape[0]))
            offset = rows[-1].stop
        latents = torch.cat([p.latents for p, halves in zip(group, per_path, strict=True) for _ in halves])
        embeds = torch.cat([e for halves in per_path for e in halves])
        added = unet_added_kwargs([a for p in group for a in p.added_conditions()],
                                  [p.latents.shape[0] for p in group for _ in p.added_conditions()])
        timesteps = t
        if any(p.timestep is not None for p in group):  # one timestep per row
            timesteps = torch.cat([torch.as_tensor(t if p.timestep is None else p.timestep, device=latents.device)
                                   .reshape(1).expand(r.stop - r.start) for p, r in zip(group, rows, strict=True)])
        if controller is not None:
            controller.subject_tokens.update({p.role: p.conditioning.tokens for p in group})
            controller.begin_call(rows)
        noise = unet(latents, timesteps, encoder_hidden_states=embeds, **added).sample
        for p, path in zip(group, rows, strict=True):
            if p.wants_eps and not p.guided:
                result[p.role] = noise[path.rows]
            elif p.wants_eps:
                u, c = noise[path.rows].chunk(2)
                result[p.role] = u + guidance_scale * (c - u)
    if controller is not None:
        controller.begin_call([])
    return result


@contextmanager
def attention_control(unets, controller: AttentionController | None) -> Iterator[None]:
    """Install the method's processors for the duration of a run, then restore the user's."""
    if controller is None:
        yield
        return
    unique = list({id(u): u for u in unets}.values())
    saved = [dict(u.attn_processors) for u in unique]
    install_processors(unique, controller)
    try:
        yield
    finally:
        for unet, processors in zip(unique, saved, strict=True):
            unet.set_attn_processor(processors)
