"""Evaluation outputs: CSV tables, a markdown table in the shape of the paper's Tables 1/3/4, plots."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from layout_retouch.evaluation.aggregate import METRICS
from layout_retouch.metrics.layout_diversity import plot_center_scatter, plot_umap

# Table 4's row names for the ablation ids.
METHOD_LABELS = {
    "I": "I: personalized model",
    "II": "II: + step-blended layout",
    "III": "III: + single-pass reference swap",
    "IV": "IV: + multi-source swap",
    "V": "V: + adaptive mask blending (full)",
    "freeu": "FreeU (baseline)",
    "magicfusion": "MagicFusion (baseline)",
    "dreammatcher": "DreamMatcher (baseline)",
}
# Decimals shown in the markdown table (the paper prints three).
TABLE_DECIMALS = 3
CSV_FILES = {
    "images": "results.csv",
    "prompts": "results_by_prompt.csv",
    "concepts": "results_by_concept.csv",
    "methods": "results_by_method.csv",
}


def write_csv(rows: Sequence[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    return path


def _fmt(value: float) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.{TABLE_DECIMALS}f}"
    )


def metric_headers(inception_label: str, preference: str) -> dict[str, str]:
    pref = {"pickscore": "PickScore", "imagereward": "ImageReward"}.get(preference, preference)
    is_model = "Inception-v3" if "torch-fidelity" in inception_label else "stand-in classifier"
    return {
        "clip_i": "CLIP-I ↑",
        "dino": "DINO ↑",
        "clip_t": "CLIP-T ↑",
        "preference": f"{pref} ↑",
        "inception_score": f"IS ({is_model}) ↑",
        "center_spread": "center spread ↑",
    }


def markdown_table(method_rows: Sequence[dict], inception_label: str, preference: str, protocol: str) -> str:
    """One table per prompt set; rows are (personalization, method): Table 1 compares a
    personalization with and without the method, Table 4 the ablation rows, Table 3 the IS column."""
    headers = metric_headers(inception_label, preference)
    lines = [
        "# Evaluation results",
        "",
        f"Metric protocol: `{protocol}`. Inception Score: {inception_label}. Preference: {preference}.",
        "Per-image scores are averaged over each prompt's images, then over prompts, then over concepts.",
        "",
    ]
    by_set: dict[str, list[dict]] = defaultdict(list)
    for row in method_rows:
        by_set[row["prompt_set"]].append(row)
    for prompt_set in sorted(by_set):
        cols = ["personalization", "method", *(headers[m] for m in METRICS), "concepts", "images"]
        lines += [f"## Prompt set: {prompt_set}", "", "| " + " | ".join(cols) + " |"]
        lines.append("| " + " | ".join(["---"] * 2 + ["---:"] * (len(cols) - 2)) + " |")
        for row in by_set[prompt_set]:
            cells = [row["personalization"], METHOD_LABELS.get(row["method"], row["method"])]
            cells += [_fmt(row[m]) for m in METRICS] + [str(row["n_concepts"]), str(row["n_images"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_metric_bars(method_rows: Sequence[dict], path: Path, headers: dict[str, str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.0 * len(METRICS), 3.2), squeeze=False)
    labels = [f"{r['personalization']}/{r['method']}" for r in method_rows]
    for ax, name in zip(axes[0], METRICS, strict=True):
        ax.bar(range(len(method_rows)), [r[name] for r in method_rows])
        ax.set_xticks(range(len(method_rows)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(headers[name], fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    tables: dict[str, list[dict]],
    out_dir: Path,
    inception_label: str,
    preference: str,
    protocol: str,
    embeddings: dict[tuple[str, str], list[np.ndarray]] | None = None,
) -> dict[str, Path]:
    """Write the CSVs, `table.md`, and per prompt set the center scatter, metric bars, and (given
    embeddings keyed by (prompt set, method)) a UMAP."""
    out_dir = Path(out_dir)
    written = {name: write_csv(tables[name], out_dir / file) for name, file in CSV_FILES.items()}
    md = markdown_table(tables["methods"], inception_label, preference, protocol)
    written["table"] = out_dir / "table.md"
    written["table"].write_text(md + "\n")
    headers = metric_headers(inception_label, preference)
    images = tables["images"]
    for prompt_set in sorted({r["prompt_set"] for r in images}):
        groups: dict[str, list] = defaultdict(list)
        for r in images:
            if r["prompt_set"] == prompt_set and not math.isnan(r["center_x"]):
                groups[f"{r['personalization']}/{r['method']}"].append((r["center_x"], r["center_y"]))
        if groups:
            path = out_dir / "plots" / f"centers_{prompt_set}.png"
            written[f"centers_{prompt_set}"] = plot_center_scatter(
                {k: np.asarray(v) for k, v in sorted(groups.items())}, path, f"subject centers, {prompt_set}"
            )
        rows = [r for r in tables["methods"] if r["prompt_set"] == prompt_set]
        written[f"bars_{prompt_set}"] = plot_metric_bars(
            rows, out_dir / "plots" / f"metrics_{prompt_set}.png", headers
        )
        if embeddings:
            groups_emb = {m: np.stack(v) for (s, m), v in sorted(embeddings.items()) if s == prompt_set}
            if groups_emb:
                path = out_dir / "plots" / f"umap_{prompt_set}.png"
                written[f"umap_{prompt_set}"] = plot_umap(
                    groups_emb, path, f"CLIP image embeddings, {prompt_set}"
                )
    return written
