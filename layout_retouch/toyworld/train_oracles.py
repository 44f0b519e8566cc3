"""Train the toy world's oracles on renders with exact labels, and measure them on fresh renders.

  python -m layout_retouch.toyworld.train_oracles --seed 0 [--which locator attributes identity]

Training images are blurred and noised at random so the oracles also read the softer images a
diffusion model draws. Held-out metrics (renders from seeds never trained on) are written next
to the weights in `metrics.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from layout_retouch.toyworld.datasets import generic_sample, near_miss_sample, personal_sample
from layout_retouch.toyworld.oracles import (
    BUILDERS,
    HAT_LABELS,
    ORACLE_DIR,
    SIZE_SCALE,
    save_oracle,
    soft_argmax,
    to_batch,
)
from layout_retouch.toyworld.render import RenderResult
from layout_retouch.toyworld.scene import CLASSES, COLOR_NAMES, SCENE_NAMES

HELD_OUT_SEED = 900_000_000  # evaluation renders use seeds from here on; training seeds stay below
IGNORE = -100  # label of a head that does not apply (the color of a patterned star)


@dataclass
class OracleRecipe:
    steps: int
    batch: int = 64
    lr: float = 2e-3
    pool: int = 12000


RECIPES = {
    "locator": OracleRecipe(steps=800),
    "attributes": OracleRecipe(steps=1600),
    "identity": OracleRecipe(steps=500),
}
BLUR_PROB, MAX_BLUR_SIGMA, MAX_NOISE = 0.5, 1.2, 0.04  # augmentation toward generated images


def mixed_sample(seed: int) -> RenderResult:
    """Generic scenes with the personal star and near-misses mixed in (the locator's and reader's data)."""
    kind = seed % 10
    if kind == 0:
        return personal_sample(seed)
    if kind == 1:
        return near_miss_sample(seed)
    return generic_sample(seed)


def identity_sample(seed: int) -> RenderResult:
    """Half personal stars; the rest near-misses (most) and other generic objects."""
    kind = seed % 4
    if kind < 2:
        return personal_sample(seed)
    if kind == 2:
        return near_miss_sample(seed)
    return generic_sample(seed)


SAMPLERS: dict[str, Callable[[int], RenderResult]] = {
    "locator": mixed_sample, "attributes": mixed_sample, "identity": identity_sample,
}


def labels(samples: list[RenderResult]) -> dict[str, torch.Tensor]:
    specs = [s.spec for s in samples]
    return {
        "mask": torch.from_numpy(np.stack([s.mask for s in samples])).float(),
        "center": torch.tensor([s.center for s in samples], dtype=torch.float32),
        "size": torch.tensor([s.size for s in samples], dtype=torch.float32),
        "scene": torch.tensor([SCENE_NAMES.index(p.scene) for p in specs]),
        "obj": torch.tensor([CLASSES.index(p.obj) for p in specs]),
        "color": torch.tensor([COLOR_NAMES.index(p.color) if p.pattern == "solid" else IGNORE
                               for p in specs]),
        "hat": torch.tensor([HAT_LABELS.index(p.hat or "none") for p in specs]),
        "fence": torch.tensor([int(p.fence) for p in specs]),
        "identity": torch.tensor([int(p.pattern == "personal") for p in specs]),
    }


def render_pool(sampler, seeds) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    samples = [sampler(int(s)) for s in seeds]
    return to_batch([s.image for s in samples]), labels(samples)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    sigma = torch.rand(n, generator=gen) * MAX_BLUR_SIGMA
    blur = torch.rand(n, generator=gen) < BLUR_PROB
    coords = torch.arange(-2, 3, dtype=torch.float32)
    out = x.clone()
    for i in torch.nonzero(blur).flatten().tolist():
        k = torch.exp(-coords ** 2 / (2 * max(float(sigma[i]), 0.3) ** 2))
        k = (k / k.sum()).view(1, 1, 1, 5).repeat(3, 1, 1, 1)
        img = F.conv2d(F.pad(x[i:i + 1], (2, 2, 0, 0), mode="replicate"), k, groups=3)
        out[i] = F.conv2d(F.pad(img, (0, 0, 2, 2), mode="replicate"), k.transpose(2, 3), groups=3)[0]
    scale = 1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.1
    noise = torch.randn(x.shape, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * MAX_NOISE
    return (out * scale + noise).clamp(0, 1)


def loss_of(name: str, model, x, y) -> torch.Tensor:
    if name == "locator":
        mask_logits, heat, size = model(x)
        center = soft_argmax(heat)
        cell = (y["center"].floor().clamp(0, 63)).long()
        heat_ce = F.cross_entropy(heat.flatten(1), cell[:, 1] * 64 + cell[:, 0])
        return (F.binary_cross_entropy_with_logits(mask_logits, y["mask"])
                + F.l1_loss(center, y["center"]) / 4 + 0.1 * heat_ce
                + F.l1_loss(size, y["size"] / SIZE_SCALE) * 10)
    out = model(x)
    return sum(F.cross_entropy(logits, y[head], ignore_index=IGNORE) for head, logits in out.items())


@torch.no_grad()
def evaluate(name: str, model, n: int) -> dict[str, float]:
    """Held-out metrics on `n` fresh renders (seeds never used in training)."""
    model.eval()
    x, y = render_pool(SAMPLERS[name], range(HELD_OUT_SEED, HELD_OUT_SEED + n))
    if name == "locator":
        mask_logits, heat, size = model(x)
        pred = mask_logits > 0
        truth = y["mask"] > 0.5
        inter = (pred & truth).flatten(1).sum(1).float()
        union = (pred | truth).flatten(1).sum(1).float().clamp(min=1)
        err = (soft_argmax(heat) - y["center"]).norm(dim=1)
        return {"center_error_px_mean": float(err.mean()), "center_error_px_p95": float(err.quantile(0.95)),
                "size_error_px_mean": float((size * SIZE_SCALE - y["size"]).abs().mean()),
                "mask_iou_mean": float((inter / union).mean())}
    out = model(x)
    metrics = {}
    for head, logits in out.items():
        keep = y[head] != IGNORE
        metrics[f"{head}_accuracy"] = float((logits.argmax(1)[keep] == y[head][keep]).float().mean())
    return metrics


def train(name: str, seed: int, recipe: OracleRecipe, out: Path, eval_n: int) -> dict[str, float]:
    torch.manual_seed(seed)
    model = BUILDERS[name]()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps,
                                                pct_start=0.1)
    start = time.time()
    x_pool, y_pool = render_pool(SAMPLERS[name], range(seed * 10_000_000, seed * 10_000_000 + recipe.pool))
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(recipe.steps), desc=name)
    for _ in bar:
        idx = torch.from_numpy(rng.integers(0, recipe.pool, recipe.batch))
        x = augment(x_pool[idx], gen)
        loss = loss_of(name, model, x, {k: v[idx] for k, v in y_pool.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    metrics = evaluate(name, model, eval_n)
    metrics["train_seconds"] = round(time.time() - start)
    save_oracle(model, name, out, metadata=metrics)
    print(name, metrics, flush=True)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--which", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ORACLE_DIR)
    parser.add_argument("--steps", type=int, default=None, help="override every recipe's steps (smoke runs)")
    parser.add_argument("--pool", type=int, default=None, help="override the number of training renders")
    parser.add_argument("--eval-n", type=int, default=1000, help="held-out renders per oracle")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    metrics_path = args.out / "metrics.json"
    all_metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    for name in args.which:
        recipe = RECIPES[name]
        recipe = OracleRecipe(steps=args.steps or recipe.steps, batch=recipe.batch, lr=recipe.lr,
                              pool=args.pool or recipe.pool)
        all_metrics[name] = train(name, args.seed, recipe, args.out, args.eval_n)
        args.out.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text(json.dumps(all_metrics, indent=2) + "\n")


if __name__ == "__main__":
    main()
