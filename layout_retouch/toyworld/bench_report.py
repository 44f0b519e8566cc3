"""The benchmark's tables and figures: Table 4 in markdown, Fig. 1 center scatters, image grids, Fig. 8.

Everything here reads finished units (per-image records and PNG strips), so reports can be
rebuilt from a resumed or copied run without generating anything.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from layout_retouch.outputs import atomic_write_bytes, save_png  # noqa: E402
from layout_retouch.toyworld.bench_stats import MIN_SUBJECT_PIXELS, summarize  # noqa: E402
from layout_retouch.toyworld.render import SIZE  # noqa: E402

# Table 4's component columns: which parts each ablation row switches on.
COMPONENTS = ("Step-blended denoising", "Reference swap, single pass", "Multi-source attention swap",
              "Adaptive mask blending")
ROW_COMPONENTS = {
    "I": (False, False, False, False),
    "II": (True, False, False, False),
    "III": (True, True, False, False),
    "IV": (True, False, True, False),
    "V": (True, False, True, True),
}
ROW_NAMES = {"I": "personalized model alone", "II": "+ step-blending (layout)", "III": "+ single-pass reference",
             "IV": "+ multi-source swap", "V": "+ mask blending (full)",
             "freeu": "FreeU (baseline)", "magicfusion": "MagicFusion (baseline)",
             "dreammatcher": "DreamMatcher (baseline)"}
GRID_COLUMNS = 8  # seeds shown per prompt in an image grid
CELL, LABEL = 64, 14  # grid cell side and label height, pixels


def summarize_units(units: dict[str, dict]) -> dict:
    """Summaries over all prompts and over the normal and challenging sets (template -> unit)."""
    out = {}
    for subset in ("all", "normal", "challenging"):
        chosen = {t: u for t, u in units.items() if subset == "all" or u["kind"] == subset}
        if chosen:
            free = {t for t, u in chosen.items() if not u["fixes_position"]}
            out[subset] = summarize({t: u["records"] for t, u in chosen.items()}, free)
    return out


def fmt(measure: dict | None, digits: int = 3) -> str:
    if not measure:
        return "n/a"
    return f"{measure['mean']:.{digits}f} [{measure['ci_low']:.{digits}f}, {measure['ci_high']:.{digits}f}]"


MEASURE_HEADER = ("Identity | Prompt fidelity (normal) | Prompt fidelity (challenging) | Prompt fidelity (all) | "
                  "Diversity, px | Subject visible")


def measure_cells(summary: dict) -> str:
    """The MEASURE_HEADER cells of one row: each a mean with its interval."""
    def get(subset: str, key: str):
        return (summary.get(subset) or {}).get(key)

    return (f"{fmt(get('all', 'identity'))} | {fmt(get('normal', 'prompt_fidelity'))} | "
            f"{fmt(get('challenging', 'prompt_fidelity'))} | {fmt(get('all', 'prompt_fidelity'))} | "
            f"{fmt(get('all', 'diversity'), 1)} | {fmt(get('all', 'subject_visible'), 2)}")


def table4(results: dict) -> str:
    """One markdown table per personalization, rows I-V, in the shape of the paper's Table 4."""
    lines = []
    for name, rows in results["results"].items():
        lines += [f"### {name}", "",
                  "| | " + " | ".join(COMPONENTS) + f" | {MEASURE_HEADER} |",
                  "|---" * (len(COMPONENTS) + 7) + "|"]
        for row, summary in rows.items():
            marks = " | ".join("✓" if on else "" for on in ROW_COMPONENTS.get(row, (False,) * len(COMPONENTS)))
            lines.append(f"| {row} | {marks} | {measure_cells(summary)} |")
        lines.append("")
    return "\n".join(lines)


def attribute_table(results: dict) -> str:
    """Per asked-for attribute, the share of images that follow it (rows x personalizations)."""
    lines = []
    for name, rows in results["results"].items():
        keys = sorted({k for s in rows.values() for k in s["all"]["attributes"]})
        lines += [f"### {name}: share of images that follow each request", "",
                  "| | " + " | ".join(keys) + " | all context at once |", "|---" * (len(keys) + 2) + "|"]
        for row, summary in rows.items():
            attrs = summary["all"]["attributes"]
            cells = [f"{attrs[k]['rate']:.2f} (n={attrs[k]['n']})" if k in attrs else "" for k in keys]
            context = summary["all"]["context_all"]
            lines.append(f"| {row} | " + " | ".join(cells) + f" | {'' if context is None else f'{context:.2f}'} |")
        lines.append("")
    return "\n".join(lines)


def scatter(units_by_row: dict[str, dict[str, dict]], title: str, path: Path) -> Path:
    """Paper Fig. 1: subject centers of every seed of the position-free prompts, one panel per row."""
    rows = list(units_by_row)
    fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows), 2.9), squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        for i, (template, unit) in enumerate(units_by_row[row].items()):
            if unit["fixes_position"]:
                continue
            xs, ys = zip(*(r["center"] for r in unit["records"]), strict=True)
            ax.scatter(xs, ys, s=9, alpha=0.7, color=f"C{i % 10}", label=template.replace("a photo of a ", ""))
        ax.set(xlim=(0, SIZE), ylim=(SIZE, 0), aspect="equal", title=f"{row}: {ROW_NAMES[row]}",
               xticks=[0, SIZE // 2, SIZE], yticks=[0, SIZE // 2, SIZE])
        ax.title.set_fontsize(8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(len(labels), 1)), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def image_grid(units: dict[str, dict], strip_for, path: Path) -> Path:
    """Rows: prompts; columns: the first GRID_COLUMNS seeds; each row labelled with its prompt."""
    from layout_retouch.toyworld.bench_units import strip_cells

    count = min(GRID_COLUMNS, len(next(iter(units.values()))["seeds"]))
    canvas = Image.new("RGB", (CELL * count, len(units) * (CELL + LABEL)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (template, unit) in enumerate(units.items()):
        top = i * (CELL + LABEL)
        draw.text((2, top + 1), unit["prompt"], fill="black")
        cells = strip_cells(strip_for(template), len(unit["seeds"]))[:count]
        for j, cell in enumerate(cells):
            canvas.paste(cell.resize((CELL, CELL), Image.NEAREST), (j * CELL, top + LABEL))
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_png(canvas, path)


def write_reports(settings, results: dict, all_units: dict[str, dict[str, dict[str, dict]]]) -> None:
    """table.md, scatter_<personalization>.png and grids/<personalization>_<row>.png under settings.out."""
    from layout_retouch.toyworld.bench_units import unit_path

    out = settings.out
    by_template = {p.template: p for p in settings.prompts}
    for name, rows in all_units.items():
        scatter(rows, f"subject centers, {name} (position-free prompts, {len(settings.seeds)} seeds each)",
                out / f"scatter_{name}.png")
        for row, units in rows.items():
            strip = lambda t, n=name, r=row: unit_path(out / "runs", n, r, by_template[t]).with_suffix(".png")
            image_grid(units, strip, out / "grids" / f"{name}_{row}.png")
    text = ["# Toy-world ablation (paper Table 4)", "",
            f"{len(settings.prompts)} prompts x {len(settings.seeds)} seeds, {settings.steps} DDIM steps. "
            "Each cell: mean [95% bootstrap interval over seeds]. Identity: the oracle's probability of the "
            "personal `sks star`. Prompt fidelity: share of the prompt's scene/size/accessory/occluder/position "
            "requests the image follows. Diversity: std of the subject center across seeds within a prompt "
            "(pixels of the 64x64 image), averaged over prompts without a position phrase. Subject visible: share "
            f"of images where the locator finds at least {MIN_SUBJECT_PIXELS} subject pixels (the oracles still "
            "read a center and attributes from an empty scene, so read the other columns with this one).", "",
            table4(results), attribute_table(results)]
    missing = results["personalizations"]["missing"]
    if missing:
        text += ["Missing personalizations: " + "; ".join(f"{k} ({v})" for k, v in missing.items()), ""]
    atomic_write_bytes(out / "table.md", "\n".join(text).encode())


def write_sweep_report(settings, sweep: dict) -> None:
    """sweep.md (one row per point) and sweep.png (identity vs prompt fidelity, one curve per parameter)."""
    from layout_retouch.toyworld.bench_units import SWEEP_SYMBOLS, SWEEP_VALUES

    points = sweep["points"]
    lines = [f"# Trade-off sweep (paper Fig. 8): full method V, {sweep['personalization']}", "",
             f"{len(settings.prompts)} prompts x {len(settings.seeds)} seeds, {settings.steps} steps; "
             "mean [95% bootstrap interval over seeds].", "",
             f"| T_l | S_ref | S_mask | {MEASURE_HEADER} |", "|---" * 9 + "|"]
    for point in points.values():
        c = point["changes"]
        lines.append(f"| {c['vanilla_steps']} | {c['ref_start_step']} | {c['mask_start_step']} | "
                     f"{measure_cells(point['summary'])} |")
    atomic_write_bytes(settings.out / "sweep.md", ("\n".join(lines) + "\n").encode())

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for k, name in enumerate(SWEEP_VALUES):
        chosen = [p for p in points.values() if name in p["swept"]]
        chosen.sort(key=lambda p: p["changes"][name])
        xs = [p["summary"]["all"]["prompt_fidelity"]["mean"] for p in chosen]
        ys = [p["summary"]["all"]["identity"]["mean"] for p in chosen]
        xerr = [[x - p["summary"]["all"]["prompt_fidelity"]["ci_low"] for x, p in zip(xs, chosen, strict=True)],
                [p["summary"]["all"]["prompt_fidelity"]["ci_high"] - x for x, p in zip(xs, chosen, strict=True)]]
        yerr = [[y - p["summary"]["all"]["identity"]["ci_low"] for y, p in zip(ys, chosen, strict=True)],
                [p["summary"]["all"]["identity"]["ci_high"] - y for y, p in zip(ys, chosen, strict=True)]]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", ms=4, capsize=2, lw=1, color=f"C{k}",
                    label=SWEEP_SYMBOLS[name])
        for x, y, p in zip(xs, ys, chosen, strict=True):
            ax.annotate(str(p["changes"][name]), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7,
                        color=f"C{k}")
    ax.set(xlabel="prompt fidelity (share of requests followed)", ylabel="identity (oracle probability)",
           title=f"identity vs prompt fidelity, V on {sweep['personalization']}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(settings.out / "sweep.png", dpi=100)
    plt.close(fig)
