"""A word-level CLIP tokenizer for the toy world, saved with the pipeline like SD's own.

It is a genuine `CLIPTokenizer` (so `from_pretrained`, `add_tokens` and Textual Inversion work
unchanged): its vocabulary holds every word of the world as one token, plus single letters so
an unknown word still tokenizes (letter by letter). Its BPE merges spell each world word out
from its letters, so each of them becomes exactly one token.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

from layout_retouch.toyworld.scene import vocabulary

MAX_LENGTH = 32  # tokens per prompt, start and end tokens included (SD uses 77)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _spellings(word: str) -> list[tuple[str, str]]:
    """The merges that glue `word` together left to right: (w o), (wo r), (wor d</w>)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    merges, head = [], parts[0]
    for part in parts[1:]:
        merges.append((head, part))
        head = head + part
    return merges


def build_tokenizer(words: list[str] | None = None) -> CLIPTokenizer:
    """A word-level CLIPTokenizer over `words` (default: the world's vocabulary)."""
    words = words or vocabulary()
    tokens = [BOS, EOS, "<|pad|>"]
    for ch in string.ascii_lowercase + string.digits:
        tokens += [ch, ch + "</w>"]
    merges: list[tuple[str, str]] = []
    for word in words:
        for a, b in _spellings(word):
            if (a, b) not in merges:
                merges.append((a, b))
            if a + b not in tokens:
                tokens.append(a + b)
    # Intermediate pieces ("st", "sta") must be tokens for BPE; only the full words are used.
    # A word whose letters an earlier merge grabs ("hat" -> "h" + "at") gets one more merge that
    # joins the pieces it ends up in; repeat until every word is one token.
    for _ in range(len(words)):
        tok = _make(tokens, merges)
        split = [(w, tok.tokenize(w)) for w in words if len(tok.tokenize(w)) != 1]
        if not split:
            return tok
        for _word, pieces in split:
            head = pieces[0]
            for piece in pieces[1:]:
                if (head, piece) not in merges:
                    merges.append((head, piece))
                head += piece
                if head not in tokens:
                    tokens.append(head)
    raise RuntimeError("could not make every word a single token")


def _make(tokens: list[str], merges: list[tuple[str, str]]) -> CLIPTokenizer:
    vocab = {tok: i for i, tok in enumerate(tokens)}
    with tempfile.TemporaryDirectory() as tmp:
        vocab_path, merges_path = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_path.write_text(json.dumps(vocab))
        merges_path.write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
        tok = CLIPTokenizer(vocab=str(vocab_path), merges=str(merges_path), model_max_length=MAX_LENGTH,
                            bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)
    return tok
