"""Helpers for the metrics/evaluation tests: tiny random metric models saved as local folders,
a concept dataset, and a deterministic stand-in image generator (no diffusion needed)."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from layout_retouch.evaluation.concepts import write_concept_metadata
from layout_retouch.tiny_models import tiny_tokenizer

TINY_IMAGE = 32  # input size of every tiny metric model


def _text_config(tokenizer, max_positions=77) -> dict:
    return dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              image_size=TINY_IMAGE, patch_size=8)


def build_tiny_metric_models(root: Path) -> dict[str, str]:
    """Save tiny CLIP, DINO (ViT), OWLv2 and an image classifier under `root`; returns their paths."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
        ViTModel,
    )

    root = Path(root)
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    paths = {k: str(root / k) for k in ("clip", "dino", "owl", "classifier")}
    clip = CLIPModel(CLIPConfig(text_config=_text_config(tok), vision_config=VISION, projection_dim=16))
    clip.save_pretrained(paths["clip"])
    size = {"shortest_edge": TINY_IMAGE}
    crop = {"height": TINY_IMAGE, "width": TINY_IMAGE}
    CLIPProcessor(CLIPImageProcessor(size=size, crop_size=crop), tok).save_pretrained(paths["clip"])
    ViTModel(ViTConfig(**VISION), add_pooling_layer=False).save_pretrained(paths["dino"])
    square = {"height": TINY_IMAGE, "width": TINY_IMAGE}
    ViTImageProcessor(size=square).save_pretrained(paths["dino"])
    owl_cfg = Owlv2Config(text_config=_text_config(tok, 16), vision_config=VISION, projection_dim=32)
    Owlv2ForObjectDetection(owl_cfg).save_pretrained(paths["owl"])
    Owlv2Processor(Owlv2ImageProcessor(size=square), tiny_tokenizer(16)).save_pretrained(paths["owl"])
    ViTForImageClassification(ViTConfig(**VISION, num_labels=10)).save_pretrained(paths["classifier"])
    ViTImageProcessor(size=square).save_pretrained(paths["classifier"])
    return paths


def metric_cli_args(paths: dict[str, str]) -> list[str]:
    return [
        "--clip-model", paths["clip"], "--dino-model", paths["dino"], "--pickscore-model", paths["clip"],
        "--pickscore-processor", paths["clip"], "--detector-model", paths["owl"],
        "--is-backend", "transformers", "--is-classifier", paths["classifier"], "--device", "cpu",
    ]


def make_concept(folder: Path, n_images: int = 2, live: bool = True, class_word: str = "dog") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(folder.name.encode()))
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    write_concept_metadata(folder, token="sks", class_word=class_word, live=live, reference_image="00.png")
    return folder


def stand_in_generator(request) -> Image.Image:
    """A deterministic picture per (prompt, seed, method): a colored square whose place moves with
    the seed. Appends the process rank to $EVAL_TEST_LOG when set (to see who generated what)."""
    log = os.environ.get("EVAL_TEST_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.environ.get('RANK', '0')} {request.method} {request.prompt} {request.seed}\n")
    key = zlib.crc32(f"{request.prompt}|{request.seed}|{request.method}".encode())
    rng = np.random.default_rng(key)
    pixels = np.full((48, 64, 3), rng.integers(0, 255, 3), dtype=np.uint8)
    x, y = rng.integers(0, 48), rng.integers(0, 32)
    pixels[y : y + 16, x : x + 16] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels)
