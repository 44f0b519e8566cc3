"""`personalize(config)`: fine-tune a Stable Diffusion pipeline on subject photos, end to end."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch

from layout_retouch.outputs import make_readable
from layout_retouch.personalize.base import default_device, load_base_pipeline, training_resolution
from layout_retouch.personalize.common import PersonalizationMethod, write_metadata
from layout_retouch.personalize.config import PersonalizeConfig
from layout_retouch.personalize.data import load_masks, load_photos, subject_masks, subject_photos
from layout_retouch.personalize.dreambooth import DreamBooth
from layout_retouch.personalize.lora import DreamBoothLoRA
from layout_retouch.personalize.prior import ensure_class_images
from layout_retouch.personalize.textual_inversion import TextualInversion
from layout_retouch.personalize.training import train

METHOD_CLASSES: dict[str, type[PersonalizationMethod]] = {
    "dreambooth": DreamBooth, "lora": DreamBoothLoRA, "textual_inversion": TextualInversion,
}


@dataclass
class PersonalizeResult:
    output: Path  # the personalized model (folder)
    config: PersonalizeConfig  # the settings used, defaults filled in
    start_step: int  # > 0 when resumed from a checkpoint
    steps: int
    train_seconds: float  # the optimisation loop only
    class_image_seconds: float  # generating prior-preservation images (0 when reused or off)
    final_loss: float | None  # mean of the last steps' losses (None when no step ran)


FINAL_LOSS_WINDOW = 20  # [choice] steps averaged into final_loss, to smooth the per-step noise


def personalize(config: PersonalizeConfig) -> PersonalizeResult:
    """Train `config.method` on the photos in `config.photos` and write the result to `config.output`."""
    cfg = config.resolved()
    photo_paths = subject_photos(cfg.photos)  # fail on an empty folder before loading any model
    mask_paths = subject_masks(photo_paths, cfg.subject_masks) if cfg.subject_masks else None
    device = cfg.device or default_device()
    pipe = load_base_pipeline(cfg.base, device)
    cfg.resolution = cfg.resolution or training_resolution(pipe)
    photos = load_photos(photo_paths, cfg.resolution)
    masks = load_masks(mask_paths, cfg.resolution) if mask_paths else None

    class_images, class_seconds = None, 0.0
    if cfg.method == "dreambooth" and cfg.with_prior_preservation:
        began = time.perf_counter()
        paths = ensure_class_images(
            pipe, cfg.class_data_dir, cfg.class_prompt, cfg.num_class_images, cfg.seed,
            cfg.class_inference_steps, cfg.class_guidance_scale, progress=cfg.progress,
        )
        class_seconds = time.perf_counter() - began
        class_images = load_photos(paths, cfg.resolution)

    method = METHOD_CLASSES[cfg.method](pipe, cfg)
    params = method.setup()
    outcome = train(method, params, cfg, photos, class_images, masks)

    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    method.save(output)
    tail = outcome.losses[-FINAL_LOSS_WINDOW:]
    result = PersonalizeResult(
        output=output, config=cfg, start_step=outcome.start_step, steps=outcome.steps,
        train_seconds=outcome.seconds, class_image_seconds=class_seconds,
        final_loss=sum(tail) / len(tail) if tail else None,
    )
    write_metadata(output, _metadata(result, method))
    make_readable(output)  # a model folder to share or copy, not owner-only files
    return result


def _metadata(result: PersonalizeResult, method: PersonalizationMethod) -> dict:
    cfg = result.config
    meta = {
        "method": cfg.method, "token": cfg.token, "class_word": cfg.class_word, "base": cfg.base,
        "instance_prompt": cfg.instance_prompt(),
        "steps": result.steps, "resumed_from_step": result.start_step,
        "train_seconds": round(result.train_seconds, 1),
        "class_image_seconds": round(result.class_image_seconds, 1),
        "final_loss": result.final_loss, "device": str(method.pipe.device),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "config": dataclasses.asdict(cfg),
    }
    if isinstance(method, DreamBooth):
        meta["omitted_components"] = method.omitted_components()
    if isinstance(method, TextualInversion):
        meta["num_vectors"] = cfg.num_vectors
    return meta
