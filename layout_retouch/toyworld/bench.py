"""The toy-world benchmark: the paper's ablation (Table 4) and layout figure (Fig. 1), scored by oracles.

For each shipped personalization (DreamBooth, LoRA, Textual Inversion), each ablation row I-V and
each prompt, the same seeds run in one batched pipeline call; the oracles read every image and the
per-image records are written atomically, one file per (personalization, row, prompt), so an
interrupted run resumes where it stopped. Row II needs no call of its own: it is row V's Stage 1
output (`layout_images`) for the same seeds. The reference inversion is cached under `DIR/cache`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from layout_retouch.config import BASELINES, LayoutRetouchConfig
from layout_retouch.errors import LayoutRetouchError
from layout_retouch.outputs import atomic_write_bytes
from layout_retouch.toyworld.bench_prompts import BenchPrompt
from layout_retouch.toyworld.bench_units import SWEEP_VALUES, load_unit, unit_path, write_unit
from layout_retouch.toyworld.world import CLASS_WORD, REFERENCE_NAME, TOKEN, TOY_METHOD, TOY_MODELS

METHODS = ("I", "II", "III", "IV", "V")
ROWS = METHODS + BASELINES  # the ablation's rows, then the paper's baselines (`toy-bench --baselines`)
# The personalizations the benchmark looks for under the toy models folder, in table order.
PERSONALIZATION_FOLDERS = {
    "dreambooth": "sks_star_dreambooth",
    "lora": "sks_star_lora",
    "textual_inversion": "sks_star_ti",
}
DEFAULT_SEEDS = 16
# DDIM steps of the default run: the paper's 50. The default run (3 personalizations x 4 prompts x 16
# seeds x rows I-V) measured 16 min on the quiet 2-core CPU with the shipped (grown) toy UNet, 24 min
# on one core (docs/RESULTS.md). At other counts (--steps, --quick) step-indexed settings keep their
# share of the trajectory.
DEFAULT_STEPS = 50
PAPER_STEPS = 50  # the step count the paper's S_ref (and so S_mask) is given for
QUICK_SEEDS, QUICK_STEPS = 2, 10
METADATA_FILE = "personalization.json"  # written by `layout-retouch personalize` beside its weights


@dataclass(frozen=True)
class Personalization:
    name: str  # dreambooth | lora | textual_inversion (the `personalization` kind of the pipeline)
    path: Path
    token: str
    class_word: str

    @property
    def subject(self) -> str:
        """The phrase that replaces `{}` in a prompt this model generates from."""
        return f"{self.token} {self.class_word}"


@dataclass
class BenchSettings:
    out: Path
    prompts: list[BenchPrompt]
    seeds: tuple[int, ...]
    steps: int
    personalizations: tuple[str, ...] = tuple(PERSONALIZATION_FOLDERS)
    methods: tuple[str, ...] = METHODS
    models_dir: Path = TOY_MODELS
    overrides: dict = field(default_factory=dict)  # config values on top of the toy method's

    @property
    def reference(self) -> Path:
        return self.models_dir / "references" / REFERENCE_NAME

    def config(self, method: str, **changes) -> LayoutRetouchConfig:
        """The paper's defaults (S_ref scaled to the step count), the demo's toy-world settings
        (TOY_METHOD), then `overrides` and `changes`."""
        scaled = {**scaled_step_settings(self.steps), **(scaled_baseline_steps(self.steps, method))}
        return LayoutRetouchConfig(method=method, num_inference_steps=self.steps,
                                   inversion_cache_dir=str(self.out / "cache"),
                                   **{**scaled, **TOY_METHOD, **self.overrides, **changes})


def scaled_step_settings(steps: int) -> dict:
    """S_ref is a step index given for the paper's 50 steps: keep its share of the trajectory at other
    counts (T_l is a fraction already; S_mask follows S_ref by default)."""
    if steps == PAPER_STEPS:
        return {}
    return {"ref_start_step": round(LayoutRetouchConfig().ref_start_step * steps / PAPER_STEPS)}


def scaled_baseline_steps(steps: int, method: str) -> dict:
    """DreamMatcher's step indices (given for 50 steps, as S_ref) keep their share of the trajectory too."""
    if method != "dreammatcher" or steps == PAPER_STEPS:
        return {}
    from layout_retouch.baselines.dreammatcher import DreamMatcherConfig

    default = DreamMatcherConfig()
    return {"baselines": {"dreammatcher": {
        "start_step": round(default.start_step * steps / PAPER_STEPS),
        "guidance_start_step": round(default.guidance_start_step * steps / PAPER_STEPS)}}}


def find_personalizations(models_dir: Path, names) -> tuple[list[Personalization], dict[str, str]]:
    """The requested personalizations that exist, and why each missing one is missing."""
    found, missing = [], {}
    for name in names:
        if name not in PERSONALIZATION_FOLDERS:
            raise LayoutRetouchError(f"unknown personalization {name!r}; choose from "
                                     f"{', '.join(PERSONALIZATION_FOLDERS)}")
        folder = models_dir / PERSONALIZATION_FOLDERS[name]
        if not folder.is_dir() or not any(folder.iterdir()):
            missing[name] = f"{folder} does not exist (not trained yet?)"
            continue
        meta = json.loads((folder / METADATA_FILE).read_text()) if (folder / METADATA_FILE).is_file() else {}
        found.append(Personalization(name, folder, meta.get("token", TOKEN), meta.get("class_word", CLASS_WORD)))
    return found, missing


def model_digests(folders: list[Path]) -> dict[str, str]:
    """Short sha256 of every weights file under `folders`: which models a result was measured on."""
    digests = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.safetensors")):
            digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return digests


def check_models(settings: BenchSettings) -> None:
    needed = [settings.models_dir / "vanilla" / "model_index.json", settings.reference]
    absent = [str(p) for p in needed if not p.exists()]
    if absent:
        raise LayoutRetouchError(f"the toy world's models are missing ({', '.join(absent)}); see "
                                 "layout_retouch/toyworld/README.md for the commands that train them")


def calls_for(methods: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
    """Pipeline calls to make, each with the rows it yields: V (or else IV) also yields II."""
    calls, layout_made = [], False
    for method in ("I", "V", "IV", "III"):
        if method in methods:
            rows = (method,)
            if method in ("V", "IV") and "II" in methods and not layout_made:
                rows, layout_made = (method, "II"), True
            calls.append((method, rows))
    if "II" in methods and not layout_made:
        calls.append(("II", ("II",)))
    return calls + [(baseline, (baseline,)) for baseline in BASELINES if baseline in methods]


def generate(pipe, method: str, text: str, seeds, config: LayoutRetouchConfig, reference: Path
             ) -> dict[str, list[Image.Image]]:
    """One batched call for all seeds; returns the images of each row it yields."""
    import torch

    generator = [torch.Generator().manual_seed(int(s)) for s in seeds]
    out = pipe(text, reference_image=str(reference) if config.uses_reference else None, config=config,
               num_images_per_prompt=len(seeds), generator=generator)
    rows = {method: out.images}
    if out.layout_images is not None and method in ("IV", "V"):
        rows["II"] = out.layout_images
    return rows


class PipelineCache:
    """Loads each personalization's pipeline once, when the first unfinished unit needs it."""

    def __init__(self, settings: BenchSettings):
        self.settings, self.pipes = settings, {}

    def get(self, p: Personalization):
        from layout_retouch.pipeline import LayoutRetouchPipeline

        if p.name not in self.pipes:
            self.pipes.clear()  # one pipeline in memory at a time
            self.pipes[p.name] = LayoutRetouchPipeline.from_pretrained(
                str(self.settings.models_dir / "vanilla"), personalized=str(p.path), personalization=p.name,
                token=p.token, class_word=p.class_word, progress=False)
        return self.pipes[p.name]


def run_units(settings: BenchSettings, group: str, personalization: Personalization,
              configs: dict[str, LayoutRetouchConfig], calls, pipes: PipelineCache, oracles,
              log: Callable[[str], None] = print) -> dict[str, dict[str, dict]]:
    """Make (or load) every unit of one group; returns row -> prompt template -> unit."""
    made = {row for _, rows in calls for row in rows}
    units: dict[str, dict[str, dict]] = {row: {} for row in ROWS if row in made}
    root = settings.out / "runs"
    for prompt in settings.prompts:
        text = prompt.text(personalization.subject)
        for method, rows in calls:
            paths = {row: unit_path(root, group, row, prompt) for row in rows}
            done = {row: load_unit(paths[row], settings.seeds, configs[row].to_dict()) for row in rows}
            if all(u is not None for u in done.values()):
                for row in rows:
                    units[row][prompt.template] = done[row]
                continue
            pipe = pipes.get(personalization)
            start = time.perf_counter()
            images = generate(pipe, method, text, settings.seeds, configs[method], settings.reference)
            seconds = time.perf_counter() - start
            for row in rows:
                extra = {"made_by": method} if row != method else None
                units[row][prompt.template] = write_unit(
                    paths[row], images[row], prompt, text, settings.seeds, configs[row].to_dict(),
                    seconds if row == method else 0.0, oracles, extra)
            log(f"{group:>20} {'+'.join(rows):>6}  {seconds:6.1f} s  {text}")
    return units


def bench_configs(settings: BenchSettings) -> dict[str, LayoutRetouchConfig]:
    return {m: settings.config(m) for m in ROWS}


def run_bench(settings: BenchSettings, log: Callable[[str], None] = print) -> dict:
    """The ablation over every available personalization; returns (and writes) `results.json`."""
    from layout_retouch.toyworld.bench_report import summarize_units, write_reports
    from layout_retouch.toyworld.oracles import Oracles

    check_models(settings)
    found, missing = find_personalizations(settings.models_dir, settings.personalizations)
    if not found:
        raise LayoutRetouchError("none of the personalized toy models exists: " + "; ".join(missing.values()))
    for name, why in missing.items():
        log(f"skipping {name}: {why}")
    start = time.perf_counter()
    oracles, pipes = Oracles.load(), PipelineCache(settings)
    configs = bench_configs(settings)
    calls = calls_for(settings.methods)
    all_units = {p.name: run_units(settings, p.name, p, configs, calls, pipes, oracles, log) for p in found}
    results = {
        "benchmark": "toy-world ablation (paper Table 4, Fig. 1)",
        "settings": settings_dict(settings),
        "config": {m: configs[m].to_dict() for m in settings.methods},
        "personalizations": {
            "found": {p.name: {"path": str(p.path), "token": p.token, "class_word": p.class_word} for p in found},
            "missing": missing,
            "weights_sha256": model_digests([settings.models_dir / "vanilla", *(p.path for p in found)]),
        },
        "results": {name: {row: summarize_units(units[row]) for row in settings.methods}
                    for name, units in all_units.items()},
        "seconds": {"wall_this_invocation": round(time.perf_counter() - start, 1),
                    "generation_total": round(sum(u["seconds"] for units in all_units.values()
                                                  for rows in units.values() for u in rows.values()), 1)},
    }
    write_reports(settings, results, all_units)
    atomic_write_bytes(settings.out / "results.json", json.dumps(results, indent=1).encode())
    return results


def settings_dict(settings: BenchSettings) -> dict:
    return {"prompts": [{"template": p.template, "kind": p.kind, "fixes_position": p.fixes_position}
                        for p in settings.prompts],
            "seeds": list(settings.seeds), "steps": settings.steps, "methods": list(settings.methods),
            "models_dir": str(settings.models_dir), "reference": str(settings.reference),
            "overrides": settings.overrides}


# --------------------------------------------------------------------- the T_l / S_ref / S_mask sweep

def sweep_points(settings: BenchSettings) -> dict[str, dict]:
    """Point name -> config changes; each swept parameter moves alone from the defaults."""
    scale = settings.steps / PAPER_STEPS
    defaults = settings.config("V")
    base = {"vanilla_steps": defaults.num_vanilla_steps, "ref_start_step": defaults.ref_start_step,
            "mask_start_step": defaults.mask_start}
    points: dict[str, dict] = {}
    for name, values in SWEEP_VALUES.items():
        for value in values:
            changes = dict(base)
            changes[name] = min(round(value * scale), settings.steps)
            if name == "ref_start_step":
                changes["mask_start_step"] = changes[name]  # S_mask = S_ref, the default rule
            key = "tl{vanilla_steps}_sref{ref_start_step}_smask{mask_start_step}".format(**changes)
            points.setdefault(key, {"changes": changes, "swept": []})["swept"].append(name)
    return points


def run_sweep(settings: BenchSettings, log: Callable[[str], None] = print) -> dict:
    """Full method (V) on the first available personalization, one parameter moved at a time."""
    from layout_retouch.toyworld.bench_report import summarize_units, write_sweep_report
    from layout_retouch.toyworld.oracles import Oracles

    check_models(settings)
    found, missing = find_personalizations(settings.models_dir, settings.personalizations)
    if not found:
        raise LayoutRetouchError("none of the personalized toy models exists: " + "; ".join(missing.values()))
    personalization = found[0]
    start = time.perf_counter()
    oracles, pipes = Oracles.load(), PipelineCache(settings)
    points = sweep_points(settings)
    rows = {}
    for key, point in points.items():
        configs = {"V": settings.config("V", **point["changes"])}
        units = run_units(settings, f"sweep-{personalization.name}/{key}", personalization, configs,
                          [("V", ("V",))], pipes, oracles, log)["V"]
        rows[key] = {**point, "summary": summarize_units(units)}
    sweep = {
        "benchmark": "toy-world trade-off sweep (paper Fig. 8), full method V",
        "personalization": personalization.name, "settings": settings_dict(settings),
        "points": rows, "seconds": round(time.perf_counter() - start, 1),
    }
    write_sweep_report(settings, sweep)
    atomic_write_bytes(settings.out / "sweep.json", json.dumps(sweep, indent=1).encode())
    return sweep


def seeds_of(count: int) -> tuple[int, ...]:
    if count < 1:
        raise LayoutRetouchError("--seeds must be at least 1")
    return tuple(range(count))

