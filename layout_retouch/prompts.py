"""The three prompts of the method and where the subject sits in their token sequences.

P_p is the user's prompt with the personal token; P_v drops the token so that the vanilla model
draws a generic instance of the class (the layout); P_n names only the subject, so that the
retouch borrows the scene from the layout rather than from the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from layout_retouch.errors import PromptError

NEUTRAL_TEMPLATE = "a photo of a {token} {class_word}"  # ALGORITHM.md: P_n = "a photo of a sks dog"


@dataclass(frozen=True)
class SubjectPrompts:
    personalized: str  # P_p
    vanilla: str  # P_v
    neutral: str  # P_n


def _word_pattern(word: str) -> re.Pattern[str]:
    # A whole word: not glued to letters, digits or the characters tokens like <cat-toy> use.
    return re.compile(rf"(?<![\w<>\-]){re.escape(word)}(?![\w<>\-])", re.IGNORECASE)


def derive_prompts(prompt: str, token: str, class_word: str) -> SubjectPrompts:
    """P_p, P_v and P_n for a prompt that contains `token` (raises PromptError otherwise)."""
    if not token:
        raise PromptError("the personal token is empty; pass --token (e.g. sks or <cat-toy>)")
    token_re = _word_pattern(token)
    if not token_re.search(prompt):
        raise PromptError(
            f"prompt {prompt!r} does not contain the personal token {token!r}; write it where the "
            f"subject goes, e.g. 'a {token} {class_word} on the beach'"
        )
    # Token followed by its class word ("a sks dog"): drop the token. Otherwise ("a <cat-toy> in
    # the snow") the class word takes the token's place, so the vanilla model still draws the class.
    followed = re.compile(token_re.pattern + r"\s+(?=" + re.escape(class_word) + r"(?![\w<>\-]))", re.IGNORECASE)
    vanilla = followed.sub("", prompt)
    vanilla = token_re.sub(class_word, vanilla)
    vanilla = re.sub(r"\s{2,}", " ", vanilla).strip()
    return SubjectPrompts(
        personalized=prompt,
        vanilla=vanilla,
        neutral=NEUTRAL_TEMPLATE.format(token=token, class_word=class_word),
    )


def _count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def subject_token_indices(tokenizer, prompt: str, words: list[str]) -> list[int]:
    """Positions, in the padded input ids of `prompt`, of every token piece of every `words` occurrence.

    Works for any Hugging Face tokenizer by tokenizing the prompt's prefixes up to each word's start
    and end: the pieces in between are the word's, however many a BPE or multi-vector token needs.
    """
    leading = 1 if tokenizer.bos_token_id is not None and _has_bos(tokenizer) else 0
    limit = tokenizer.model_max_length - 1  # the last slot is the end token
    indices: set[int] = set()
    for word in words:
        for match in _word_pattern(word).finditer(prompt):
            start = _count_tokens(tokenizer, prompt[: match.start()])
            end = _count_tokens(tokenizer, prompt[: match.end()])
            indices.update(i + leading for i in range(start, end) if i + leading < limit)
    return sorted(indices)


def _has_bos(tokenizer) -> bool:
    ids = tokenizer("x").input_ids
    return len(ids) > 0 and ids[0] == tokenizer.bos_token_id
