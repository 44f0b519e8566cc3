"""Loading the pipeline to fine-tune, with errors that say what to fix."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

from layout_retouch.errors import ModelLoadError


def load_base_pipeline(base: str, device: str, **components) -> StableDiffusionPipeline:
    """A float32 StableDiffusionPipeline from a local folder or a hub id, on `device`.

    `components` (e.g. vae=...) are used instead of loading those from `base`.
    """
    looks_local = base.startswith((".", "/", "~")) or Path(base).exists() or base.count("/") != 1
    if looks_local and not (Path(base).expanduser() / "model_index.json").is_file():
        raise ModelLoadError(
            f"{base!r} is not a diffusers pipeline folder (no model_index.json there); pass a folder written "
            "by save_pretrained or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5"
        )
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(Path(base).expanduser()) if looks_local else base,
            dtype=torch.float32, safety_checker=None, requires_safety_checker=False, **components,
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the pipeline {base!r}: {err}") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def training_resolution(pipe: StableDiffusionPipeline) -> int:
    """The image size the UNet was trained at: its latent sample size times the VAE's down-scaling."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def noise_scheduler_for(pipe: StableDiffusionPipeline) -> DDPMScheduler:
    """The DDPM forward process of the pipeline's own schedule (betas, timesteps, prediction type)."""
    return DDPMScheduler.from_config(pipe.scheduler.config)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
