"""Prompts turned into what the UNet is called with, for each architecture (architecture.py).

SD 1.x/2.x: one CLIP's last hidden state. SDXL: both encoders' penultimate hidden states side by side,
plus the UNet's `added_cond_kwargs` (the second encoder's pooled projection and the time ids), carried
by the same `Conditioning` so that every path's UNet call (both stages, the reference's inversion) gets
them without knowing the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layout_retouch.architecture import sdxl_time_ids


@dataclass
class Conditioning:
    """A prompt encoded by one model's text encoder(s), with that model's unconditional embedding."""

    cond: torch.Tensor  # (1, L, D)
    uncond: torch.Tensor | None  # (1, L, D); None for an unguided path (an inversion)
    tokens: list[int]  # positions of the subject's tokens in the prompt
    added: dict[str, torch.Tensor] | None = None  # SDXL: the UNet's added_cond_kwargs for `cond`, (1, ...) each
    uncond_added: dict[str, torch.Tensor] | None = None  # ... and for `uncond`

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the UNet sees, for cache keys."""
        found = [t for t in (self.cond, self.uncond) if t is not None]
        for added in (self.added, self.uncond_added):
            found += [added[k] for k in sorted(added or {})]
        return found


def unet_added_kwargs(halves: list[dict[str, torch.Tensor] | None], rows: list[int]) -> dict:
    """`added_cond_kwargs` for a batch whose consecutive blocks of `rows[i]` rows use `halves[i]` ({} for SD)."""
    if not halves or halves[0] is None:
        return {}
    return {"added_cond_kwargs": {name: torch.cat([h[name].expand(n, *h[name].shape[1:])
                                                   for h, n in zip(halves, rows, strict=True)])
                                  for name in halves[0]}}


def _input_ids(tokenizer, text: str, device) -> torch.Tensor:
    return tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


@torch.no_grad()
def encode_text(tokenizer, text_encoder, text: str) -> torch.Tensor:
    """SD 1.x/2.x: the CLIP text encoder's last hidden state."""
    return text_encoder(_input_ids(tokenizer, text, text_encoder.device))[0].to(text_encoder.dtype)


@torch.no_grad()
def encode_text_sdxl(tokenizers, text_encoders, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL: each encoder's penultimate hidden state, concatenated on channels; the last one's pooled projection."""
    states = []
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        out = encoder(_input_ids(tokenizer, text, encoder.device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
    dtype = text_encoders[-1].dtype
    return torch.cat(states, dim=-1).to(dtype), out.text_embeds


class PromptEncoder:
    """Encodes prompts for one model pair at one image size; the unconditional half once per text encoder.

    `zero_unconditional` is SDXL's `force_zeros_for_empty_prompt`: its unconditional half is zeros (text
    and pooled), as in diffusers' pipeline without a negative prompt.
    """

    def __init__(self, models, size: tuple[int, int]):
        self.models = models
        self.size = size
        self.architecture = models.architecture
        self.zero_unconditional = bool(getattr(models.pipe.config, "force_zeros_for_empty_prompt", False))
        self._unconditional: dict = {}

    def embed(self, text: str, personalized: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """The prompt's text embedding and, for SDXL, its added conditioning (pooled text, time ids)."""
        encoders = self.models.text_encoders(personalized)
        if not self.architecture.added_conditioning:
            return encode_text(self.models.tokenizer, encoders[0], text), None
        embeds, pooled = encode_text_sdxl(self.models.tokenizers, encoders, text)
        return embeds, {"text_embeds": pooled, "time_ids": sdxl_time_ids(self.size, embeds.dtype, embeds.device)}

    def unconditional(self, personalized: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        models = self.models
        encoders = models.text_encoders(personalized)
        state = (tuple(id(e) for e in encoders), personalized if models.switch is not None else None)
        if state not in self._unconditional:
            embeds, added = self.embed("", personalized)
            if self.zero_unconditional:
                embeds = torch.zeros_like(embeds)
                added = {**added, "text_embeds": torch.zeros_like(added["text_embeds"])}
            self._unconditional[state] = embeds, added
        return self._unconditional[state]

    def guided(self, text: str, personalized: bool, tokens: list[int]) -> Conditioning:
        """A prompt with its model's unconditional half, for classifier-free guidance."""
        cond, added = self.embed(text, personalized)
        uncond, uncond_added = self.unconditional(personalized)
        return Conditioning(cond, uncond, tokens, added, uncond_added)

    def unguided(self, text: str, personalized: bool = True) -> Conditioning:
        """A prompt alone (an inversion's)."""
        cond, added = self.embed(text, personalized)
        return Conditioning(cond, None, [], added)
