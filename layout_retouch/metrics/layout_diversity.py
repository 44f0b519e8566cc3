"""Layout diversity: where the subject sits in each image (a zero-shot detector prompted with the
class word), how far those centers spread per prompt, and the paper's Fig. 1 scatter plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from layout_retouch.errors import LayoutRetouchError
from layout_retouch.metrics.defaults import DEFAULT_DETECTOR_MODEL  # noqa: F401  (re-exported)
from layout_retouch.metrics.loading import load_pretrained, resolve_device

# Text query given to the detector; `{}` is the concept's class word (OWL-ViT's prompt style).
DETECTOR_QUERY_TEMPLATE = "a photo of a {}"


class SubjectCenterDetector:
    """OWLv2 prompted with the class word; the best-scoring box gives the subject's center."""

    def __init__(self, model_id: str = DEFAULT_DETECTOR_MODEL, device: str | None = "cpu") -> None:
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        self.device = resolve_device(device)
        what = "subject detector (layout diversity)"
        self.model = load_pretrained(Owlv2ForObjectDetection, model_id, what, "--detector-model")
        self.model = self.model.to(self.device).eval()
        self.processor = load_pretrained(Owlv2Processor, model_id, what, "--detector-model")

    @torch.no_grad()
    def centers(self, images: Sequence[Image.Image], class_word: str) -> tuple[np.ndarray, np.ndarray]:
        """(N, 2) centers (x, y) as fractions of the image width and height, and (N,) box scores."""
        query = DETECTOR_QUERY_TEMPLATE.format(class_word)
        images = [i.convert("RGB") for i in images]
        inputs = self.processor(text=[[query]] * len(images), images=images, return_tensors="pt")
        out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        logits = out.logits[..., 0].float().cpu()  # (N, boxes), one text query
        best = logits.argmax(dim=1)
        boxes = out.pred_boxes.float().cpu()[torch.arange(len(images)), best]  # (cx, cy, w, h)
        pairs = zip(images, boxes, strict=True)
        centers = [padded_box_center(box[:2].tolist(), *image.size) for image, box in pairs]
        scores = torch.sigmoid(logits[torch.arange(len(images)), best]).numpy()
        return np.asarray(centers), scores


def padded_box_center(center: tuple[float, float], width: int, height: int) -> tuple[float, float]:
    """OWLv2 pads each image to a square at the bottom/right and gives boxes as fractions of that
    square: turn a box center into fractions of the image itself (clipped to the image)."""
    side = max(width, height)
    x, y = center[0] * side / width, center[1] * side / height
    return min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0)


def center_spread(centers: np.ndarray) -> float:
    """Root-mean-square distance of the centers from their mean (0: every subject at one spot)."""
    centers = np.asarray(centers, dtype=np.float64)
    if len(centers) == 0:
        return float("nan")
    return float(np.sqrt(((centers - centers.mean(axis=0)) ** 2).sum(axis=1).mean()))


def plot_center_scatter(groups: Mapping[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """One panel per group (e.g. method) with every subject center, image coordinates (y down)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(groups), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    for ax, (label, centers) in zip(axes[0], groups.items(), strict=False):
        centers = np.asarray(centers).reshape(-1, 2)
        ax.scatter(centers[:, 0], centers[:, 1], s=10, alpha=0.6)
        ax.set(
            xlim=(0, 1), ylim=(1, 0), aspect="equal", title=f"{label}\nspread {center_spread(centers):.3f}"
        )
        ax.set_xticks([0, 0.5, 1])
        ax.set_yticks([0, 0.5, 1])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_umap(embeddings: Mapping[str, np.ndarray], path: str | Path, title: str = "", seed: int = 0) -> Path:
    """2-D UMAP of image embeddings, colored by group (needs the optional `umap` extra)."""
    try:
        import umap
    except ImportError:
        raise LayoutRetouchError("the UMAP plot needs umap-learn: install the `umap` extra") from None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(embeddings)
    data = np.concatenate([np.asarray(embeddings[k]) for k in labels])
    points = umap.UMAP(random_state=seed).fit_transform(data)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    start = 0
    for label in labels:
        n = len(embeddings[label])
        ax.scatter(points[start : start + n, 0], points[start : start + n, 1], s=8, label=label)
        start += n
    ax.legend(fontsize=7)
    ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
