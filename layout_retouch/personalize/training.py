"""The training loop every method shares: DDPM noise, noise-prediction MSE, AdamW, checkpoints.

Every random draw (which photos, latent samples, noise, timesteps) comes from one CPU generator
seeded by the config and saved in each checkpoint, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from layout_retouch.personalize.base import noise_scheduler_for
from layout_retouch.personalize.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from layout_retouch.personalize.common import PersonalizationMethod
from layout_retouch.personalize.config import PersonalizeConfig

VAE_ENCODE_BATCH = 8  # [choice] images per VAE call when caching latents


@dataclass
class TrainingOutcome:
    start_step: int  # 0, or the checkpoint step a resumed run started from
    steps: int  # the step count reached
    seconds: float  # wall time of the optimisation steps run here
    losses: list[float] = field(default_factory=list)  # one per step run here


@dataclass
class LatentSource:
    """The VAE posterior of each training image, encoded once; each step draws a fresh sample."""

    mean: torch.Tensor
    std: torch.Tensor
    scale: float
    shift: float

    @classmethod
    def encode(cls, vae: AutoencoderKL, pixels: torch.Tensor) -> LatentSource:
        means, stds = [], []
        with torch.no_grad():
            for chunk in pixels.split(VAE_ENCODE_BATCH):
                dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
                means.append(dist.mean)
                stds.append(dist.std)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return cls(torch.cat(means), torch.cat(stds), float(vae.config.scaling_factor), float(shift))

    def sample(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` latents of randomly chosen images, and which images they are."""
        index = torch.randint(len(self.mean), (count,), generator=generator)
        eps = torch.randn(self.mean[index].shape, generator=generator).to(self.mean.device)
        return (self.mean[index] + self.std[index] * eps - self.shift) * self.scale, index


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean squared error over the mask's pixels (weighted by its soft values); all pixels when None."""
    if mask is None:
        return F.mse_loss(prediction.float(), target.float())
    squared = (prediction.float() - target.float()) ** 2 * mask
    return squared.sum() / (mask.sum() * prediction.shape[1]).clamp_min(1e-8)


def train(
    method: PersonalizationMethod, params: dict[str, torch.nn.Parameter], config: PersonalizeConfig,
    photos: torch.Tensor, class_images: torch.Tensor | None, masks: torch.Tensor | None = None,
) -> TrainingOutcome:
    """Run `config.max_steps` optimisation steps (from the newest checkpoint when `config.resume`).

    With `masks` ((N, 1, H, W) in [0, 1], one per photo) the subject photos' loss counts only the
    subject's pixels, so that the background of the photos is not learned; class images count whole.
    """
    pipe = method.pipe
    device = pipe.unet.device
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(
        list(params.values()), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
    )
    noise_scheduler = noise_scheduler_for(pipe)
    instance = LatentSource.encode(pipe.vae, photos)
    prior = LatentSource.encode(pipe.vae, class_images) if class_images is not None else None
    latent_masks = None
    if masks is not None:  # area-averaged to the latent grid: a latent pixel half on the subject weighs 0.5
        latent_masks = F.interpolate(masks.float(), size=instance.mean.shape[-2:], mode="area").to(device)
    instance_prompt = method.training_prompt(config.instance_prompt())
    prompts = [instance_prompt] * config.batch_size
    if prior is not None:
        prompts += [config.class_prompt] * config.batch_size

    checkpoints = Path(config.work_dir) / "checkpoints"
    fingerprint = config.training_fingerprint()
    start = 0
    if config.resume:
        found = list_checkpoints(checkpoints)
        if found:
            start = load_checkpoint(found[-1], params, optimizer, generator, fingerprint)
            method.after_optimizer_step()  # re-apply the method's constraints to the restored tensors
        else:
            tqdm.write(f"personalize: no checkpoint in {checkpoints}, starting from step 0")

    outcome = TrainingOutcome(start_step=start, steps=start, seconds=0.0)
    began = time.perf_counter()
    bar = tqdm(range(start, config.max_steps), initial=start, total=config.max_steps,
               desc=f"personalize ({method.name})", disable=not config.progress)
    for step in bar:
        latents, index = instance.sample(config.batch_size, generator)
        mask = latent_masks[index.to(device)] if latent_masks is not None else None
        if prior is not None:
            latents = torch.cat([latents, prior.sample(config.batch_size, generator)[0]])
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(
            noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator
        ).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = pipe.unet(noisy, timesteps, method.encode_prompts(prompts)).sample
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        if prior is None:
            loss = masked_mse(prediction, target, mask)
        else:
            pred_subject, pred_class = prediction.chunk(2)
            target_subject, target_class = target.chunk(2)
            loss = masked_mse(pred_subject, target_subject, mask) + config.prior_loss_weight * (
                masked_mse(pred_class, target_class, None)
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_optimizer_step()
        outcome.losses.append(loss.item())
        outcome.steps = step + 1
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if outcome.steps % config.checkpoint_every == 0:
            save_checkpoint(checkpoints, outcome.steps, params, optimizer, generator, fingerprint,
                            keep=config.checkpoints_total_limit)
    outcome.seconds = time.perf_counter() - began
    return outcome
