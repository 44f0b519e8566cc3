"""Ground-truth readers of toy-world images: small CNNs trained on renders with exact labels.

- `Locator`: the subject's visible mask, its center (soft-argmax of a heat map) and its size;
  also the toy world's stand-in for Segment Anything (see `segmenter.py`).
- `AttributeReader`: scene classifier, class and color of the subject, accessory detector (hat
  color or none) and occluder detector (fence or not), as heads on one shared trunk.
- `IdentityScorer`: probability that the subject is the personal `sks star` rather than a
  near-miss star or any other object.

`Oracles.load()` reads all three from `models/oracles/`; `Oracles.read(images)` returns their
readings as plain Python values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from layout_retouch.toyworld.scene import CLASSES, COLOR_NAMES, SCENE_NAMES

ORACLE_DIR = Path(__file__).parent / "models" / "oracles"
HAT_LABELS = ("none",) + COLOR_NAMES  # accessory head: no hat, or the hat's color
IMAGE_SIZE = 64
SIZE_SCALE = 64.0  # the size head predicts diameter / SIZE_SCALE


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class Trunk(nn.Module):
    """64x64 image -> features at 64, 32, 16 and 8 pixels."""

    def __init__(self, widths=(16, 32, 64, 64)):
        super().__init__()
        self.stages = nn.ModuleList()
        cin = 3
        for w in widths:
            self.stages.append(_block(cin, w))
            cin = w

    def forward(self, x):
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(x if i == 0 else F.avg_pool2d(x, 2))
            feats.append(x)
        return feats


class Locator(nn.Module):
    """Small U-Net: visible-mask logits and center heat-map logits at 64x64, plus a size value."""

    def __init__(self):
        super().__init__()
        self.trunk = Trunk()
        self.up3 = _block(64 + 64, 64)
        self.up2 = _block(64 + 32, 32)
        self.up1 = _block(32 + 16, 16)
        self.head = nn.Conv2d(16, 2, 1)  # channel 0: mask, channel 1: center heat map
        self.size_head = nn.Linear(64, 1)

    def forward(self, x):
        f1, f2, f3, f4 = self.trunk(x)
        up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")
        y = self.up3(torch.cat([up(f4), f3], 1))
        y = self.up2(torch.cat([up(y), f2], 1))
        y = self.up1(torch.cat([up(y), f1], 1))
        out = self.head(y)
        size = self.size_head(f4.mean((2, 3))).squeeze(1)
        return out[:, 0], out[:, 1], size


def soft_argmax(heat_logits: torch.Tensor) -> torch.Tensor:
    """(N, H, W) logits -> (N, 2) expected (x, y) in pixel coordinates (pixel i spans [i, i+1))."""
    n, h, w = heat_logits.shape
    p = heat_logits.flatten(1).softmax(1).view(n, h, w)
    xs = torch.arange(w, dtype=p.dtype) + 0.5
    ys = torch.arange(h, dtype=p.dtype) + 0.5
    return torch.stack([(p.sum(1) * xs).sum(1), (p.sum(2) * ys).sum(1)], 1)


class Classifier(nn.Module):
    """Shared trunk, global pooling, one linear head per named label set."""

    def __init__(self, heads: dict[str, int]):
        super().__init__()
        self.trunk = Trunk()
        self.mix = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(128 + 128, n) for name, n in heads.items()})

    def forward(self, x):
        f = self.mix(self.trunk(x)[-1])
        pooled = torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)
        return {name: head(pooled) for name, head in self.heads.items()}


def attribute_reader() -> Classifier:
    return Classifier({"scene": len(SCENE_NAMES), "obj": len(CLASSES), "color": len(COLOR_NAMES),
                       "hat": len(HAT_LABELS), "fence": 2})


def identity_scorer() -> Classifier:
    return Classifier({"identity": 2})


BUILDERS = {"locator": Locator, "attributes": attribute_reader, "identity": identity_scorer}


def save_oracle(model: nn.Module, name: str, folder: Path = ORACLE_DIR, metadata: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path


def load_oracle(name: str, folder: Path = ORACLE_DIR) -> nn.Module:
    path = Path(folder) / f"{name}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"oracle weights {path} are missing; train them with "
                                "`python -m layout_retouch.toyworld.train_oracles`")
    model = BUILDERS[name]()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()


def to_batch(images) -> torch.Tensor:
    """PIL images or uint8 HWC arrays (any size; resized to 64x64) -> float NCHW in [0, 1]."""
    arrays = []
    for im in images:
        if isinstance(im, Image.Image):
            im = im.convert("RGB")
            if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            im = np.asarray(im)
        arrays.append(np.asarray(im, dtype=np.uint8))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


@dataclass
class Reading:
    """What the oracles see in one image."""

    scene: str
    obj: str
    color: str
    hat: str | None
    fence: bool
    identity: float  # probability of the personal subject
    center: tuple[float, float]  # (x, y) pixels, in 64x64 image coordinates
    size: float  # diameter, pixels
    mask: np.ndarray  # (64, 64) bool, visible subject pixels


class Oracles:
    """All oracles together, loaded once."""

    def __init__(self, locator: nn.Module, attributes: nn.Module, identity: nn.Module):
        self.locator, self.attributes, self.identity = locator, attributes, identity

    @classmethod
    def load(cls, folder: str | Path = ORACLE_DIR) -> Oracles:
        return cls(*(load_oracle(name, Path(folder)) for name in ("locator", "attributes", "identity")))

    @torch.no_grad()
    def read(self, images, batch_size: int = 64) -> list[Reading]:
        readings: list[Reading] = []
        for start in range(0, len(images), batch_size):
            x = to_batch(images[start:start + batch_size])
            mask_logits, heat, size = self.locator(x)
            centers = soft_argmax(heat)
            attrs = {k: v.argmax(1) for k, v in self.attributes(x).items()}
            ident = self.identity(x)["identity"].softmax(1)[:, 1]
            for i in range(len(x)):
                hat = HAT_LABELS[int(attrs["hat"][i])]
                readings.append(Reading(
                    scene=SCENE_NAMES[int(attrs["scene"][i])], obj=CLASSES[int(attrs["obj"][i])],
                    color=COLOR_NAMES[int(attrs["color"][i])], hat=None if hat == "none" else hat,
                    fence=bool(attrs["fence"][i]), identity=float(ident[i]),
                    center=(float(centers[i, 0]), float(centers[i, 1])), size=float(size[i]) * SIZE_SCALE,
                    mask=(mask_logits[i] > 0).numpy(),
                ))
        return readings
