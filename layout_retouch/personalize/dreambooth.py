"""DreamBooth: fine-tune the UNet (all of it, or the parameters named) and optionally the text encoder."""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import torch

from layout_retouch.errors import LayoutRetouchError, PromptError
from layout_retouch.personalize.common import PersonalizationMethod, save_dtype


class DreamBooth(PersonalizationMethod):
    """Output: a diffusers pipeline folder (safetensors), loadable with `from_pretrained`."""

    name = "dreambooth"

    def setup(self) -> dict[str, torch.nn.Parameter]:
        check_token_known(self.pipe.tokenizer, self.config.token)
        self.freeze_all()
        self.trains_text_encoder = self.config.train_text_encoder
        trained = {"unet": self.pipe.unet}
        if self.trains_text_encoder:
            trained["text_encoder"] = self.pipe.text_encoder
        patterns = {"unet": self.config.unet_trainable, "text_encoder": self.config.text_encoder_trainable}
        params = {}
        for prefix, module in trained.items():
            module.train()
            kept = matching_parameter_names(module, patterns[prefix], prefix) if patterns[prefix] else None
            for name, param in module.named_parameters():
                if kept is None or name in kept:
                    param.requires_grad_(True)
                    params[f"{prefix}.{name}"] = param
        return params

    def save(self, output: Path) -> None:
        dtype = save_dtype(self.config)
        if dtype != torch.float32:
            self.pipe.to(dtype=dtype)
        self.pipe.save_pretrained(output, safe_serialization=True)
        if self.config.omit_unchanged:
            # model_index.json still names these; load with from_pretrained(output, vae=base.vae, ...).
            for name in self.omitted_components():
                shutil.rmtree(output / name, ignore_errors=True)

    def omitted_components(self) -> list[str]:
        if not self.config.omit_unchanged:
            return []
        return ["vae"] + ([] if self.trains_text_encoder else ["text_encoder"])


def matching_parameter_names(module: torch.nn.Module, patterns: tuple[str, ...], component: str) -> set[str]:
    """The parameter names matching any pattern; a pattern that matches none is a typo."""
    names = [n for n, _ in module.named_parameters()]
    kept: set[str] = set()
    for pattern in patterns:
        matched = fnmatch.filter(names, pattern)
        if not matched:
            raise LayoutRetouchError(
                f"--{component.replace('_', '-')}-trainable {pattern!r} matches no {component} parameter; names "
                f"look like {names[0]!r} or {names[len(names) // 2]!r}"
            )
        kept.update(matched)
    return kept


def check_token_known(tokenizer, token: str) -> None:
    """DreamBooth binds the subject to an existing rare word; an unknown one would be the UNK token."""
    ids = tokenizer(token, add_special_tokens=False).input_ids
    unk = tokenizer.unk_token_id
    if not ids or (unk is not None and unk in ids and tokenizer.unk_token != tokenizer.eos_token):
        raise PromptError(
            f"the tokenizer does not know {token!r} (it becomes the unknown token); pick a rare word it "
            "knows (sks is the usual one) or use --method textual_inversion to learn a new token"
        )
