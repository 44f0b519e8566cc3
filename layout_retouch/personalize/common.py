"""What every personalization method shares: the frozen pipeline, prompt encoding, the method interface."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from layout_retouch.personalize.config import PersonalizeConfig

METADATA_FILE = "personalization.json"  # method, token, class word, base and recipe of an output


class PersonalizationMethod:
    """One way of personalizing: which tensors train, how prompts are encoded, how the result is saved.

    The training loop (training.py) is the same for all methods; subclasses override `setup`, and
    where they differ, `training_prompt`, `after_optimizer_step` and `save`.
    """

    name = ""
    trains_text_encoder = False

    def __init__(self, pipe: StableDiffusionPipeline, config: PersonalizeConfig):
        self.pipe = pipe
        self.config = config
        self._frozen_embeddings: dict[str, torch.Tensor] = {}

    def setup(self) -> dict[str, torch.nn.Parameter]:
        """Freeze the pipeline, unfreeze (or add) what this method trains; returns it by name."""
        raise NotImplementedError

    def freeze_all(self) -> None:
        for module in (self.pipe.unet, self.pipe.vae, self.pipe.text_encoder):
            module.requires_grad_(False)
            module.eval()

    def training_prompt(self, prompt: str) -> str:
        """The prompt as the tokenizer must see it during training (Textual Inversion expands it)."""
        return prompt

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder hidden states for `prompts`, with gradients only when the encoder trains."""
        if self.trains_text_encoder:
            return self._encode(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._frozen_embeddings]
        if missing:
            with torch.no_grad():
                for prompt, hidden in zip(missing, self._encode(missing), strict=True):
                    self._frozen_embeddings[prompt] = hidden
        return torch.stack([self._frozen_embeddings[p] for p in prompts])

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        tokenizer = self.pipe.tokenizer
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.pipe.text_encoder.device)
        return self.pipe.text_encoder(ids)[0]

    def after_optimizer_step(self) -> None:
        """Hook for constraints the optimizer cannot express (Textual Inversion keeps old rows fixed)."""

    def save(self, output: Path) -> None:
        raise NotImplementedError


def save_dtype(config: PersonalizeConfig) -> torch.dtype:
    return getattr(torch, config.save_dtype)


def write_metadata(output: Path, metadata: dict) -> None:
    (output / METADATA_FILE).write_text(json.dumps(metadata, indent=1, default=str) + "\n")
