"""DDIM inversion of the reference photo, cached on disk per model, image, size and schedule.

The reference path replays this trajectory, so at every step its self-attention keys and values
describe the real photo. One concept is inverted once for all its prompts and seeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from layout_retouch.architecture import SD
from layout_retouch.errors import ImageInputError
from layout_retouch.progress import Progress, track
from layout_retouch.vae import vae_precision


@dataclass
class InversionTrajectory:
    latents: list[torch.Tensor]  # latents[k]: the reference at timestep t_k; latents[-1]: its clean latent
    timesteps: torch.Tensor
    key: str | None = None  # the inversion cache's key of what it was computed from, where known


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB. Pillow's own convert clips 16-bit and 32-bit grey at 255 (a 16-bit PNG
    becomes white) and drops transparency onto black; here deep grey is scaled, alpha composed on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0  # 16 bits -> 8
        elif image.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0  # floats in [0, 1]
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def load_reference_image(image, size: tuple[int, int]) -> Image.Image:
    """Open and check a reference photo (any mode), then resize and center-crop it to (height, width)."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageInputError(f"reference image {path} does not exist")
        try:
            with Image.open(path) as opened:
                image = to_rgb(opened)
        except (OSError, ValueError) as err:
            raise ImageInputError(f"reference image {path} cannot be read as an image: {err}") from err
    elif not isinstance(image, Image.Image):
        raise ImageInputError(f"reference image must be a path or a PIL image, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ImageInputError("reference image is empty (0 pixels)")
    image = to_rgb(image)
    height, width = size
    scale = max(height / image.height, width / image.width)
    if scale > 1:
        warnings.warn(f"reference image of {image.width}x{image.height} pixels is smaller than the model's "
                      f"{width}x{height}: it is enlarged, and the subject's detail is what it holds", stacklevel=2)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           Image.BICUBIC)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


@torch.no_grad()
def encode_image(vae, image: Image.Image, architecture=None) -> torch.Tensor:
    """The VAE posterior mean, scaled like the UNet's latents (in fp32 where `architecture` upcasts, vae.py)."""
    with vae_precision(vae, architecture or SD) as dtype:
        pixels = image_to_tensor(image).to(vae.device, dtype)
        return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor


class DDIMInversion:
    """DDIM run backwards (eta 0, no guidance) one step at a time, from the clean latent up through `timesteps`.

    Stepwise, so that its UNet evaluations can ride in another loop's calls (Stage 1's, which walks the
    same timesteps the other way: the UNet takes a timestep per batch row). `stop` (0: all the way to z_T)
    is the shallowest step whose latent is wanted: the inversion is `done` once it has latent `stop`, since
    a reader that starts there never looks deeper. Being sequential, a truncated inversion can be extended
    later from its deepest latent (`states`: the latents it starts from, clean first) to the same latents a
    full one takes.
    """

    def __init__(self, scheduler, latent: torch.Tensor, timesteps: torch.Tensor, embedding: torch.Tensor,
                 added: dict[str, torch.Tensor] | None = None, states: list[torch.Tensor] | None = None,
                 stop: int = 0):
        self.alphas = scheduler.alphas_cumprod.to(latent.device)
        self.final = scheduler.final_alpha_cumprod.to(latent.device)
        self.timesteps = timesteps
        self.steps = [int(t) for t in timesteps.tolist()]  # on the host once: no device sync per step
        self.embedding = embedding
        self.added = added  # SDXL: the UNet's added_cond_kwargs for the embedding (pooled text, time ids)
        self.states = list(states) if states else [latent]
        self.stop = stop

    @property
    def complete(self) -> bool:
        """Whether every latent up to z_T is inverted (whatever `stop` asks for)."""
        return len(self.states) > len(self.timesteps)

    @property
    def done(self) -> bool:
        return len(self.states) > len(self.timesteps) - self.stop

    @property
    def index(self) -> int:
        """The position in `timesteps` of the next step (they are walked from the last to the first)."""
        return len(self.timesteps) - len(self.states)

    @property
    def timestep(self) -> torch.Tensor:
        return self.timesteps[self.index]

    @property
    def latent(self) -> torch.Tensor:
        return self.states[-1]

    def advance(self, eps: torch.Tensor) -> None:
        """Take the step with the UNet's noise prediction for `latent` at `timestep`."""
        i, x = self.index, self.latent
        a_next = self.alphas[self.steps[i]]  # noisier: where this step lands
        a_prev = self.alphas[self.steps[i + 1]] if i + 1 < len(self.steps) else self.final  # where x is now
        x0 = (x - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
        self.states.append(a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps)

    @torch.no_grad()
    def step_alone(self, unet) -> None:
        """Take the next step in a UNet call of its own."""
        extra = {} if self.added is None else {"added_cond_kwargs": self.added}
        self.advance(unet(self.latent, self.timestep, encoder_hidden_states=self.embedding, **extra).sample)

    @torch.no_grad()
    def run(self, unet, progress: Progress = True) -> InversionTrajectory:
        """Take the steps not yet taken down to `stop`, each in a UNet call of its own.

        A complete inversion's latents are a list; a truncated one's read on (`InversionLatents`), each
        latent beyond it taken when first read.
        """
        remaining = max(0, len(self.timesteps) - self.stop + 1 - len(self.states))
        for _ in track(range(remaining), "invert reference", progress if remaining else False):
            self.step_alone(unet)
        latents = self.states[::-1] if self.complete else InversionLatents(self, unet)
        return InversionTrajectory(latents, self.timesteps)


class InversionLatents(Sequence):
    """An inversion still under way, or truncated, indexed as `InversionTrajectory.latents` (k: timestep t_k;
    -1: clean).

    Its remaining steps ride in Stage 2's UNet calls; a latent read before they reach it (the reference
    path's, from step S_ref), or deeper than a truncated inversion went, is caught up with steps in calls
    of their own.
    """

    def __init__(self, inversion: DDIMInversion, unet):
        self.inversion, self.unet = inversion, unet

    def __len__(self) -> int:
        return len(self.inversion.timesteps) + 1

    def _index(self, k: int) -> int:
        """The position in the inversion's states (clean to noisy) of latent k."""
        if not -len(self) <= k < len(self):
            raise IndexError(f"latent {k} of an inversion of {len(self) - 1} steps")
        return len(self) - 1 - (k % len(self))

    def ready(self, k: int) -> bool:
        """Whether latent k is inverted already (reading it would not take steps of its own)."""
        return len(self.inversion.states) > self._index(k)

    def computed(self) -> list[torch.Tensor]:
        """The latents inverted so far, as `InversionTrajectory.latents` orders them (the deepest first)."""
        return self.inversion.states[::-1]

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        index = self._index(k)
        while len(self.inversion.states) <= index:
            self.inversion.step_alone(self.unet)
        return self.inversion.states[index]


@torch.no_grad()
def ddim_invert(unet, scheduler, latent: torch.Tensor, timesteps: torch.Tensor, embedding: torch.Tensor,
                progress: Progress = True, added: dict[str, torch.Tensor] | None = None) -> InversionTrajectory:
    """Run DDIM backwards (eta 0, no guidance) from the clean latent up through `timesteps`."""
    return DDIMInversion(scheduler, latent, timesteps, embedding, added).run(unet, progress)


@torch.no_grad()
def model_fingerprint(module: torch.nn.Module) -> str:
    """A cheap digest of a model's weights (shapes and the first 64 values of every tensor).

    The samples are one view per tensor and one copy to the host for all of them (a few operators per
    tensor made a concept's first image launch thousands more on a GPU); the digest is the same as
    when each tensor's sample was copied on its own.
    """
    state = module.state_dict()
    if not state:
        return hashlib.sha256().hexdigest()[:24]
    samples = [t.detach().as_strided((min(64, t.numel()),), (1,)) if t.is_contiguous() else t.detach().reshape(-1)[:64]
               for t in state.values()]
    if all(s.is_floating_point() for s in samples):  # cat promotes floats exactly; an integer is converted alone
        values = torch.cat(samples).float().cpu().numpy()
    else:
        values = torch.cat([s.float() for s in samples]).cpu().numpy()
    digest, offset = hashlib.sha256(), 0
    for (name, tensor), sample in zip(state.items(), samples, strict=True):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(values[offset:offset + sample.numel()].tobytes())
        offset += sample.numel()
    return digest.hexdigest()[:24]


class InversionCache:
    """Inverted trajectories on disk, keyed by model, image content, size, schedule and prompt.

    A complete trajectory is `<key>.safetensors`; a truncated one (from the clean latent to the deepest
    latent a call read, `LayoutRetouchConfig.truncate_inversion`) is `<key>.partial.safetensors`, which
    `load` does not return (so code that expects every latent never sees it) and `load_partial` does.
    """

    def __init__(self, folder: str | Path | None = None):
        default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "layout_retouch" / "inversions"
        self.folder = Path(folder) if folder else default

    def key(self, model_id: str, image: Image.Image, timesteps: torch.Tensor, prompt: str, scheduler_config,
            added: dict[str, torch.Tensor] | None = None) -> str:
        """`added`: the UNet's added conditioning (SDXL's pooled text and time ids, which carry the image size)."""
        digest = hashlib.sha256()
        digest.update(model_id.encode())
        digest.update(np.asarray(image).tobytes())
        digest.update(str(image.size).encode())
        digest.update(json.dumps([int(t) for t in timesteps]).encode())
        digest.update(prompt.encode())
        digest.update(json.dumps(dict(scheduler_config), sort_keys=True, default=str).encode())
        for name in sorted(added or {}):
            digest.update(name.encode())
            digest.update(added[name].detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:32]

    def _path(self, key: str, partial: bool = False) -> Path:
        return self.folder / f"{key}{'.partial' if partial else ''}.safetensors"

    def load(self, key: str, device, dtype) -> InversionTrajectory | None:
        """The complete trajectory, or None."""
        path = self._path(key)
        if not path.is_file():
            return None
        data = load_file(str(path))
        latents = [x[None].to(device, dtype) for x in data["latents"]]
        return InversionTrajectory(latents, data["timesteps"], key)

    def load_partial(self, key: str, device, dtype) -> list[torch.Tensor] | None:
        """A truncated trajectory's latents, clean first (`DDIMInversion.states`), or None."""
        path = self._path(key, partial=True)
        if not path.is_file():
            return None
        data = load_file(str(path))
        return [x[None].to(device, dtype) for x in data["latents"].flip(0)]

    def save(self, key: str, trajectory: InversionTrajectory) -> None:
        """Write the latents inverted so far: a complete trajectory replaces a truncated one."""
        latents = trajectory.latents
        latents = latents.computed() if isinstance(latents, InversionLatents) else list(latents)
        partial = len(latents) < len(trajectory.timesteps) + 1
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {"latents": torch.cat(latents).float().cpu().contiguous(),
                   "timesteps": torch.as_tensor(trajectory.timesteps).cpu()}
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp)
        os.replace(tmp, self._path(key, partial))
        if not partial:
            self._path(key, partial=True).unlink(missing_ok=True)
