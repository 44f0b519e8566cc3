"""Textual Inversion: learn the embedding of a new token (one or more vectors); nothing else changes."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from layout_retouch.errors import PromptError
from layout_retouch.personalize.common import PersonalizationMethod, save_dtype

EMBEDS_FILE = "learned_embeds.safetensors"  # {token: (num_vectors, dim)}, read by load_textual_inversion


def vector_tokens(token: str, num_vectors: int) -> list[str]:
    """The tokenizer entries of a multi-vector token, named as diffusers' loader names them."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def _is_one_known_word(tokenizer, text: str) -> bool:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


class TextualInversion(PersonalizationMethod):
    """Output: `learned_embeds.safetensors`, loadable with `pipe.load_textual_inversion(path, token=...)`."""

    name = "textual_inversion"
    trains_text_encoder = True  # gradients flow through it to the input embeddings

    def setup(self) -> dict[str, torch.nn.Parameter]:
        tokenizer, text_encoder = self.pipe.tokenizer, self.pipe.text_encoder
        self.tokens = vector_tokens(self.config.token, self.config.num_vectors)
        vocab = tokenizer.get_vocab()
        # A token that is already one word of the vocabulary would shadow that word in every prompt.
        known = [t for t in self.tokens if t in vocab or _is_one_known_word(tokenizer, t)]
        if known:
            raise PromptError(
                f"token {known[0]!r} is already in the tokenizer; Textual Inversion needs a new one, "
                "e.g. <sks>"
            )
        init_ids = tokenizer(self.config.initializer_word, add_special_tokens=False).input_ids
        if len(init_ids) != 1:
            raise PromptError(
                f"initializer word {self.config.initializer_word!r} is {len(init_ids)} tokens, not one; "
                "pick a single-token word close to the subject (the class word usually is)"
            )
        tokenizer.add_tokens(self.tokens)
        self.token_ids = tokenizer.convert_tokens_to_ids(self.tokens)
        rows = text_encoder.get_input_embeddings().weight.shape[0]
        text_encoder.resize_token_embeddings(max(len(tokenizer), rows), mean_resizing=False)
        self.freeze_all()
        embeddings = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            embeddings[self.token_ids] = embeddings[init_ids[0]].clone()
        self.original = embeddings.detach().clone()
        self.keep = torch.ones(embeddings.shape[0], dtype=torch.bool, device=embeddings.device)
        self.keep[self.token_ids] = False
        embeddings.requires_grad_(True)
        text_encoder.train()
        return {"text_encoder.token_embedding": embeddings}

    def training_prompt(self, prompt: str) -> str:
        # As diffusers' maybe_convert_prompt does at inference: "<sks>" -> "<sks> <sks>_1 ...".
        pattern = rf"(?<![\w<>\-]){re.escape(self.config.token)}(?![\w<>\-])"
        return re.sub(pattern, " ".join(self.tokens), prompt)

    def after_optimizer_step(self) -> None:
        # AdamW's weight decay and momentum touch every row; only the new tokens may change.
        embeddings = self.pipe.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            embeddings[self.keep] = self.original[self.keep]

    def learned_embeddings(self) -> torch.Tensor:
        return self.pipe.text_encoder.get_input_embeddings().weight[self.token_ids].detach()

    def save(self, output: Path) -> None:
        vectors = self.learned_embeddings().to("cpu", save_dtype(self.config)).contiguous()
        save_file({self.config.token: vectors}, output / EMBEDS_FILE)
