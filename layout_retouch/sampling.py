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
    return shared_guided_eps(pair, [(paths, controller)], t, guidance_scale)[0]


@torch.no_grad()
def shared_guided_eps(pair: ModelPair, runs: list[tuple[list[PathInput], AttentionController | None]], t,
                      guidance_scale: float) -> list[dict[str, torch.Tensor]]:
    """`guided_eps` for several runs at once: each run's paths that use the same model share one UNet call.

    Each run has its own controller (its step, rules and recorders) and its own roles; a path of a run other
    than the first gives its own `timestep` where it is not `t`. The processors are the first run's
    controller's: it tells them which rows are whose (`AttentionController.shared`). Returns each run's noise.
    """
    if pair.one_unet:  # the models differ in their text only: one call
        models = [None]
    else:
        models = [m for m in (False, True) if any(bool(p.personalized) is m for paths, _ in runs for p in paths)]
    groups = []
    for model in models:
        parts = [(i, [p for p in paths if model is None or bool(p.personalized) is model]) for i, (paths, _) in
                 enumerate(runs)]
        groups.append([(i, group) for i, group in parts if group])
    groups.sort(key=lambda g: any(p.role == TARGET for _, group in g for p in group))  # sources first
    results: list[dict[str, torch.Tensor]] = [{} for _ in runs]
    bound = runs[0][1]
    for parts in groups:
        unet, _ = pair.select(parts[0][1][0].personalized)
        latents, embeds, added, flat, shared = [], [], [], [], []
        start = 0  # where the run's rows begin in the call's batch
        for i, group in parts:  # each run's rows together: each path's unconditional half, then its conditional
            own, stop = [], 0  # the run's paths' rows, counted from its own first row
            for p in group:
                halves = p.embeddings()
                own.append(PathRows(p.role, stop, stop + len(halves) * p.latents.shape[0]))
                stop = own[-1].stop
                flat.append((i, p, slice(start + own[-1].start, start + stop)))
                latents += [p.latents] * len(halves)
                embeds += halves
                added += [(a, p.latents.shape[0]) for a in p.added_conditions()]
            shared.append((runs[i][1], slice(start, start + stop)))
            start += stop
            if runs[i][1] is not None:
                runs[i][1].subject_tokens.update({p.role: p.conditioning.tokens for p in group})
                runs[i][1].begin_call(own)
        latent = torch.cat(latents)
        timesteps = t
        if any(p.timestep is not None for _, p, _ in flat):  # one timestep per row
            timesteps = torch.cat([torch.as_tensor(t if p.timestep is None else p.timestep, device=latent.device)
                                   .reshape(1).expand(rows.stop - rows.start) for _, p, rows in flat])
        if len(parts) > 1 or runs[parts[0][0]][1] is not bound:
            if bound is None or any(controller is None for controller, _ in shared):
                raise ValueError("runs share a UNet call only where each has a controller")
            bound.shared = shared
        try:
            noise = unet(latent, timesteps, encoder_hidden_states=torch.cat(embeds),
                         **unet_added_kwargs([a for a, _ in added], [n for _, n in added])).sample
        finally:
            if bound is not None:
                bound.shared = None
        for i, p, rows in flat:
            if p.wants_eps and not p.guided:
                results[i][p.role] = noise[rows]
            elif p.wants_eps:
                u, c = noise[rows].chunk(2)
                results[i][p.role] = u + guidance_scale * (c - u)
        for i, _ in parts:
            if runs[i][1] is not None:
                runs[i][1].begin_call([])
    return results


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
