"""Train the toy world's vanilla text-to-image model from scratch, as a diffusers SD pipeline folder.

Two stages, each seeded, checkpointed every few minutes and resumable (rerun the same command):

  python -m layout_retouch.toyworld.train_vanilla --stage vae  --out DIR --seed 0
  python -m layout_retouch.toyworld.train_vanilla --stage unet --out DIR --seed 0

The VAE stage writes DIR/vae (and a check of the personal star's reconstruction); the UNet stage
trains the UNet and the text encoder jointly on latents of that VAE and writes the whole
`StableDiffusionPipeline` folder (fp16 weights, DDIM scheduler, no safety checker).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from layout_retouch.toyworld.checkpoint import load_checkpoint, save_checkpoint
from layout_retouch.toyworld.components import (
    UNET_ARCHITECTURES,
    UNET_VAE_FACTOR,
    build_text_encoder,
    build_unet,
    build_vae,
    mute_cross_attention,
    sample_scheduler,
    train_scheduler,
)
from layout_retouch.toyworld.datasets import generic_sample, reference_sample, vae_sample
from layout_retouch.toyworld.scene import caption
from layout_retouch.toyworld.tokenizer import build_tokenizer


@dataclass
class VaeRecipe:
    steps: int = 1700
    batch: int = 16
    lr: float = 1e-3
    pool: int = 12000  # distinct renders the VAE sees
    l1_weight: float = 0.5  # reconstruction loss = MSE + l1_weight * L1 + kl_weight * KL
    kl_weight: float = 1e-6
    decay_from: float = 0.7  # lr decays linearly to 0 over the last 30% of steps
    factor: int = 4  # image side / latent side (components.build_vae): 4 the shipped VAE, 2 for a 32x32 latent


@dataclass
class UnetRecipe:
    steps: int = 3000  # the shipped model stopped earlier, at its time budget (see README)
    batch: int = 32
    lr: float = 4e-4
    pool: int = 15000  # distinct renders (latents precomputed once)
    ema_decay: float = 0.999
    caption_dropout: float = 0.1  # share of empty captions, for classifier-free guidance
    warmup: int = 100
    decay_from: float = 1.0  # constant lr after warm-up; the EMA does the averaging
    min_snr_gamma: float = 5.0  # loss weight min(SNR, gamma) / SNR (Hang et al. 2023): faster convergence
    arch: str = "v1"  # components.UNET_ARCHITECTURES
    # Share of captions that leave the scene out (None: scene.DROP_PROB's 15%). v2 uses 0.4, so that the
    # model must also decide scenes from image structure, not from the text alone (issue 14).
    scene_drop: float | None = None
    # A trained text encoder (pipeline folder) to keep frozen, as SD keeps CLIP frozen; None: train one jointly.
    text_encoder_from: Path | None = None
    # Gray levels of render.texture_field on every training image (0: the flat renders every shipped model
    # saw); issue 14's textured pilot fine-tunes v2 on 20 (toyworld README, "the textured pilot").
    texture: float = 0.0
    # Latent sides whose cross-attention is cut from the text (components.mute_cross_attention); () keeps all.
    # Issue 14's fourteenth session tries (16, 8): the text then speaks at 4x4 only (toyworld README).
    mute_cross_attention: tuple[int, ...] = ()


CHECKPOINT_EVERY_S = 180  # seconds between checkpoints


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC images -> float NCHW in [-1, 1], as SD's VAE expects."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def lr_factor(step: int, steps: int, decay_from: float, warmup: int = 0) -> float:
    if step < warmup:
        return (step + 1) / warmup
    start = int(steps * decay_from)
    return 1.0 if step < start else max(0.0, (steps - step) / max(1, steps - start))


# ---------------------------------------------------------------- VAE stage

def train_vae(out: Path, work: Path, seed: int, recipe: VaeRecipe) -> None:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = build_vae(recipe.factor)
    opt = torch.optim.Adam(vae.parameters(), lr=recipe.lr)
    ckpt = work / "vae_checkpoint.safetensors"
    step = load_checkpoint(ckpt, {"vae": vae}, opt) if ckpt.exists() else 0
    print(f"rendering {recipe.pool} VAE training images", flush=True)
    pool = to_tensor([vae_sample(seed * 1_000_000 + i).image for i in range(recipe.pool)])
    rng = np.random.default_rng([seed, step])  # resumed runs draw fresh, but seeded, batches
    last_save = time.time()
    bar = tqdm(range(step, recipe.steps), initial=step, total=recipe.steps, desc="vae")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = recipe.lr * lr_factor(step, recipe.steps, recipe.decay_from)
        x = pool[rng.integers(0, len(pool), recipe.batch)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + recipe.l1_weight * F.l1_loss(recon, x) \
            + recipe.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if time.time() - last_save > CHECKPOINT_EVERY_S:
            save_checkpoint(ckpt, {"vae": vae}, opt, step + 1)
            last_save = time.time()
    save_checkpoint(ckpt, {"vae": vae}, opt, recipe.steps)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(pool[i:i + 256]).latent_dist.sample()
                             for i in range(0, min(2048, len(pool)), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.save_pretrained(out / "vae")
    report = check_vae(vae)
    (work / "vae_check.json").write_text(json.dumps(report, indent=2))
    print("VAE check:", report, flush=True)


@torch.no_grad()
def check_vae(vae, n: int = 16) -> dict:
    """Pixel RMSE (0-255) of reconstructions: generic scenes, and the personal star's own pixels."""
    def rmse(samples, on_mask: bool) -> float:
        x = to_tensor([s.image for s in samples])
        r = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        err = ((r - x) * 127.5) ** 2
        if on_mask:
            m = torch.from_numpy(np.stack([s.mask for s in samples]))[:, None].expand_as(err)
            return float(err[m].mean().sqrt())
        return float(err.mean().sqrt())

    generic = [generic_sample(10_000_000 + i) for i in range(n)]
    refs = [reference_sample(10_000_000 + i) for i in range(n)]
    return {"generic_rmse": rmse(generic, False), "personal_star_rmse_on_subject": rmse(refs, True),
            "generic_subject_rmse": rmse(generic, True)}


# ---------------------------------------------------------------- UNet + text encoder stage

def encode_pool(vae, seed: int, n: int, cache: Path | None = None, texture: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Latents (VAE posterior mean and std) of `n` generic renders (`texture` as in `render`), and their specs.

    With `cache` (a folder), the latents are saved there and reused by a resumed run."""
    from dataclasses import asdict

    from safetensors.torch import load_file, save_file

    from layout_retouch.toyworld.scene import SceneSpec

    if n == 0:
        return torch.zeros(0), torch.zeros(0), []
    if cache is not None:
        stem = cache / (f"latents_seed{seed}_n{n}" + (f"_texture{texture:g}" if texture else ""))
        if stem.with_suffix(".safetensors").exists():
            t = load_file(str(stem.with_suffix(".safetensors")))
            specs = [SceneSpec(**d) for d in json.loads(stem.with_suffix(".json").read_text())]
            return t["mean"], t["std"], specs
    specs, means, stds = [], [], []
    chunk = 512
    for start in tqdm(range(0, n, chunk), desc="encoding"):
        samples = [generic_sample(seed * 1_000_000 + i, split="train", texture=texture)
                   for i in range(start, min(n, start + chunk))]
        specs += [s.spec for s in samples]
        with torch.no_grad():
            dist = vae.encode(to_tensor([s.image for s in samples]).to(vae.device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    if cache is not None:
        save_file({"mean": mean.contiguous(), "std": std.contiguous()}, str(stem.with_suffix(".safetensors")))
        stem.with_suffix(".json").write_text(json.dumps([asdict(s) for s in specs]))
    return mean, std, specs


def grow(checkpoint: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer) -> int:
    """Start from a checkpoint of the UNet without 16x16 decoder attention (`build_unet(False)`).

    Every weight and optimizer moment it has is copied; the new attention blocks get a zero output
    projection, so the grown network computes exactly what the checkpoint did until training moves it.
    """
    old_unet, old_ema = build_unet(full_res_decoder_attention=False), build_unet(full_res_decoder_attention=False)
    old = {"unet": old_unet, "text_encoder": modules["text_encoder"], "ema_unet": old_ema,
           "ema_text": modules["ema_text"]}
    old_params = [*old_unet.named_parameters(), *modules["text_encoder"].named_parameters(prefix="te")]
    old_opt = torch.optim.AdamW([p for _, p in old_params])
    step = load_checkpoint(checkpoint, old, old_opt)
    for name in ("unet", "ema_unet"):
        missing, unexpected = modules[name].load_state_dict(old[name].state_dict(), strict=False)
        assert not unexpected and all(k.startswith("up_blocks.2.attentions.") for k in missing), (missing, unexpected)
        with torch.no_grad():
            for block in modules[name].up_blocks[2].attentions:
                block.proj_out.weight.zero_()
                block.proj_out.bias.zero_()
    new_params = dict([*modules["unet"].named_parameters(), *modules["text_encoder"].named_parameters(prefix="te")])
    for name, p in old_params:
        if p in old_opt.state:
            opt.state[new_params[name]] = old_opt.state[p]
    print(f"grown from {checkpoint} at step {step}", flush=True)
    return step


def continue_from(folder: Path, modules: dict[str, torch.nn.Module]) -> int:
    """Start from a committed intermediate UNet (EMA weights, as `--export` writes them): both the trained
    and the EMA UNet take them; the optimizer starts afresh (its moments are not committed: too large)."""
    from diffusers import UNet2DConditionModel

    weights = UNet2DConditionModel.from_pretrained(folder / "unet").float().state_dict()
    for name in ("unet", "ema_unet"):
        modules[name].load_state_dict(weights)
    steps_file = folder / "trained_steps.txt"
    step = int(steps_file.read_text()) if steps_file.exists() else 0
    print(f"continuing from {folder} at step {step} (fresh optimizer, warm-up again)", flush=True)
    return step


def train_unet(out: Path, work: Path, seed: int, recipe: UnetRecipe,
               max_minutes: float | None = None, grow_from: Path | None = None,
               init_from: Path | None = None, device: str = "cpu") -> None:
    """Train until `recipe.steps`, or until `max_minutes` have passed (then save the step reached).

    On another `device` the random draws are the CPU's (made there, then moved), so a run differs from a
    CPU run only by the device's arithmetic."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(out / "vae").eval().to(device)
    make_unet = UNET_ARCHITECTURES[recipe.arch]
    unet, ema_unet = make_unet(), make_unet()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if factor != UNET_VAE_FACTOR[recipe.arch]:
        raise ValueError(f"UNet layout {recipe.arch} expects a VAE of factor {UNET_VAE_FACTOR[recipe.arch]} "
                         f"({unet.config.sample_size}x{unet.config.sample_size} latents), but {out / 'vae'} has "
                         f"factor {factor}: pass --vae-from a folder with the matching VAE (or train one with "
                         f"--stage vae --vae-factor {UNET_VAE_FACTOR[recipe.arch]})")
    ema_unet.load_state_dict(unet.state_dict())
    if recipe.text_encoder_from is not None:  # frozen: trained neither by the optimizer nor the EMA
        tokenizer = CLIPTokenizer.from_pretrained(recipe.text_encoder_from / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(recipe.text_encoder_from / "text_encoder").eval()
        text_encoder.requires_grad_(False)
        ema_text = text_encoder
        params = list(unet.parameters())
        modules = {"unet": unet, "ema_unet": ema_unet}
    else:
        tokenizer = build_tokenizer()
        text_encoder, ema_text = build_text_encoder(tokenizer), build_text_encoder(tokenizer)
        ema_text.load_state_dict(text_encoder.state_dict())
        params = list(unet.parameters()) + list(text_encoder.parameters())
        modules = {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text": ema_text}
    for module in {id(m): m for m in (unet, ema_unet, text_encoder, ema_text)}.values():
        module.to(device)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=1e-2)
    ckpt = work / "unet_checkpoint.safetensors"
    fresh_moments_from = None
    if ckpt.exists():
        step = load_checkpoint(ckpt, modules, opt, device=device)
    elif grow_from is not None:
        if str(device) != "cpu":
            raise ValueError("--grow-from (the first world's grown UNet) trains on the CPU only")
        step = grow(grow_from, modules, opt)
    elif init_from is not None:
        step = fresh_moments_from = continue_from(init_from, modules)
    else:
        step = 0
    if recipe.mute_cross_attention:  # again after a resume: a no-op then, the muted weights stay zero
        for module in (unet, ema_unet):
            muted = mute_cross_attention(module, recipe.mute_cross_attention)
        print(f"cross-attention cut from the text: {', '.join(muted)}", flush=True)
    # A run resumed at its last step only exports the pipeline: no need to encode the data.
    means, stds, specs = encode_pool(vae, seed, recipe.pool if step < recipe.steps else 0, cache=work,
                                     texture=recipe.texture)
    scale = vae.config.scaling_factor
    noise_sched = train_scheduler()
    alphas = noise_sched.alphas_cumprod.to(device)
    rng = np.random.default_rng([seed, step])
    gen = torch.Generator().manual_seed(seed * 7919 + step)
    ema_params = list(ema_unet.parameters()) + ([] if ema_text is text_encoder else list(ema_text.parameters()))
    assert len(ema_params) == len(params)
    drop = None if recipe.scene_drop is None else {"scene": recipe.scene_drop}
    last_save = started = time.time()
    done = step
    bar = tqdm(range(step, recipe.steps), initial=step, total=recipe.steps, desc="unet")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = recipe.lr * lr_factor(step, recipe.steps, recipe.decay_from, recipe.warmup)
            if fresh_moments_from is not None:  # a fresh optimizer warms up again
                group["lr"] *= min(1.0, (step - fresh_moments_from + 1) / recipe.warmup)
        idx = rng.integers(0, len(specs), recipe.batch)
        texts = ["" if rng.random() < recipe.caption_dropout else caption(specs[i], rng, drop=drop) for i in idx]
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scale
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (recipe.batch,), generator=gen)
        latents, noise, t = latents.to(device), noise.to(device), t.to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        pred = unet(noisy, t, text_encoder(ids).last_hidden_state).sample
        snr = a / (1 - a)
        weight = snr.clamp(max=recipe.min_snr_gamma) / snr
        loss = (weight * (pred - noise) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))  # short runs: early weights fade fast
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)  # one launch for all, not one a tensor
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if time.time() - last_save > CHECKPOINT_EVERY_S:
            save_checkpoint(ckpt, modules, opt, done)
            last_save = time.time()
        if max_minutes is not None and time.time() - started > 60 * max_minutes:
            print(f"time budget reached at step {done}", flush=True)
            break
    save_checkpoint(ckpt, modules, opt, done)
    (work / "unet_steps.txt").write_text(f"{done}\n")
    for module in (vae, ema_unet, ema_text):
        module.to("cpu")
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=ema_text, tokenizer=tokenizer, unet=ema_unet, scheduler=sample_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    save_pipeline(pipe, out)


def export_checkpoint(work: Path, out: Path, arch: str, text_encoder_from: Path | None = None) -> int:
    """Write the EMA weights of `work`'s checkpoint as the pipeline folder `out` (next to its VAE), without
    touching the checkpoint: a run still training can be judged by its latest state. Returns the step."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from safetensors import safe_open
    from transformers import CLIPTextModel, CLIPTokenizer

    path = work / "unet_checkpoint.safetensors"
    with safe_open(str(path), "pt") as f:
        step = int(f.metadata()["step"])
        unet = UNET_ARCHITECTURES[arch]()
        unet.load_state_dict({k[len("ema_unet."):]: f.get_tensor(k) for k in f.keys() if k.startswith("ema_unet.")})
        if text_encoder_from is None:
            tokenizer = build_tokenizer()
            text_encoder = build_text_encoder(tokenizer)
            text_encoder.load_state_dict({k[len("ema_text."):]: f.get_tensor(k) for k in f.keys()
                                          if k.startswith("ema_text.")})
    if text_encoder_from is not None:
        tokenizer = CLIPTokenizer.from_pretrained(text_encoder_from / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(text_encoder_from / "text_encoder")
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(out / "vae"), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
        unet=unet.eval(), scheduler=sample_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    save_pipeline(pipe, out)
    (out / "trained_steps.txt").write_text(f"{step}\n")
    return step


def save_pipeline(pipe, out: Path) -> None:
    """Save the UNet and VAE as fp16 (halves the size; diffusers loads them back as float32 unless
    asked otherwise). The text encoder stays float32: transformers would load fp16 weights as fp16,
    and a plain `from_pretrained(folder)` must give one dtype throughout."""
    pipe.unet.half()
    pipe.vae.half()
    pipe.save_pretrained(out, safe_serialization=True)
    for module in (pipe.unet, pipe.vae):
        module.float()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["vae", "unet", "all"], default="all")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "models" / "vanilla")
    parser.add_argument("--work", type=Path, default=Path("out/toyworld_vanilla_work"),
                        help="checkpoints and logs (resumed from if present)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=VaeRecipe.steps)
    parser.add_argument("--vae-factor", type=int, choices=[2, 4], default=VaeRecipe.factor,
                        help="image side / latent side of the VAE stage's VAE (2: the 32x32 latent of --arch v4)")
    parser.add_argument("--unet-steps", type=int, default=UnetRecipe.steps)
    parser.add_argument("--pool", type=int, default=None, help="override the number of training renders")
    parser.add_argument("--unet-batch", type=int, default=UnetRecipe.batch)
    parser.add_argument("--arch", choices=sorted(UNET_ARCHITECTURES), default=UnetRecipe.arch,
                        help="UNet layout (components.py): v1 the first toy world's, v2 attention in every block, "
                             "v3 two layers a block, v4 v2 on a 32x32 latent (a --vae-factor 2 VAE)")
    parser.add_argument("--scene-drop", type=float, default=None,
                        help="share of captions without their scene (default: scene.DROP_PROB's)")
    parser.add_argument("--texture", type=float, default=UnetRecipe.texture,
                        help="gray levels of the smooth luminance texture on every training render (render.py)")
    parser.add_argument("--mute-cross-attention", type=int, nargs="+", default=[], metavar="SIDE",
                        help="latent sides (e.g. 16 8) whose cross-attention gets zero value and output "
                             "projections, which training cannot move: the text reaches the image elsewhere only")
    parser.add_argument("--text-encoder-from", type=Path, default=None,
                        help="pipeline folder whose trained tokenizer and text encoder are used, frozen")
    parser.add_argument("--vae-from", type=Path, default=None,
                        help="pipeline folder whose trained VAE is copied to OUT/vae (skips the VAE stage)")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="pipeline folder of an intermediate UNet (as --export writes it) to continue from, "
                             "with a fresh optimizer (used when --work holds no checkpoint yet)")
    parser.add_argument("--export", action="store_true",
                        help="only write the EMA weights of --work's checkpoint as the pipeline in --out")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu", help="where the UNet stage trains (cuda on a GPU machine; "
                        "the data and the random draws are made on the CPU either way)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop the UNet stage after this long (resume continues up to --unet-steps)")
    parser.add_argument("--grow-from", type=Path, default=None,
                        help="UNet checkpoint of the layout without 16x16 decoder attention to start from "
                             "(used when --work holds no checkpoint yet)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if args.vae_from is not None:
        import shutil

        shutil.copytree(args.vae_from / "vae", args.out / "vae", dirs_exist_ok=True)
    if args.export:
        if not (args.out / "vae" / "config.json").exists():
            parser.error(f"--export writes the UNet next to a VAE: {args.out / 'vae'} has none; "
                         "pass --vae-from FOLDER (a pipeline folder with vae/)")
        step = export_checkpoint(args.work, args.out, args.arch, args.text_encoder_from)
        print(f"exported the EMA weights of step {step} to {args.out}", flush=True)
        return
    if args.vae_from is None and args.stage in ("vae", "all"):
        recipe = VaeRecipe(steps=args.vae_steps, factor=args.vae_factor)
        if args.pool:
            recipe.pool = args.pool
        train_vae(args.out, args.work, args.seed, recipe)
    if args.stage in ("unet", "all"):
        recipe = UnetRecipe(steps=args.unet_steps, batch=args.unet_batch, arch=args.arch,
                            scene_drop=args.scene_drop, text_encoder_from=args.text_encoder_from,
                            texture=args.texture, mute_cross_attention=tuple(args.mute_cross_attention))
        if args.pool:
            recipe.pool = args.pool
        train_unet(args.out, args.work, args.seed, recipe, args.max_minutes, args.grow_from, args.init_from,
                   args.device)
    print(f"stage {args.stage} done in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
