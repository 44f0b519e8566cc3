"""What the web page does, without Gradio: check a request, run it through the pipeline, write the PNGs.

The method itself is `LayoutRetouchPipeline.__call__`; this module only turns the page's fields into its
arguments (the same ones `layout-retouch generate` passes), reports its steps, stops it between two
steps when asked, and writes each image as `generate` does (parameters in the PNG text chunk).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from layout_retouch.cli.generate import image_key
from layout_retouch.config import LayoutRetouchConfig
from layout_retouch.errors import LayoutRetouchError
from layout_retouch.inversion import load_reference_image
from layout_retouch.outputs import OUTPUT_KEY, mask_image, prompt_folder, save_png
from layout_retouch.pipeline import LayoutRetouchOutput, LayoutRetouchPipeline

METHODS = {  # the paper's Table 4 rows, as the page lists them
    "I": "I: plain personalized",
    "II": "II: + step-blending (the layout)",
    "III": "III: + single-pass reference swap",
    "IV": "IV: + multi-source swap",
    "V": "V: + adaptive mask (full method)",
}
logger = logging.getLogger(__name__)
MASKS = ("m_ca", "m_sam", "union", "final")  # the masks the page shows, of the five the pipeline returns
MAX_IMAGES = 8  # per prompt and seed, in one batch: more would hold the one-at-a-time queue for long


class Stopped(Exception):
    """Raised between two steps after Stop: the run ends and the images already made stay."""


@dataclass
class WebModels:
    """What the server loads once: the pipeline and the page's starting values."""

    pipe: LayoutRetouchPipeline
    model_args: argparse.Namespace  # the model options as `generate` takes them (for the PNGs' output key)
    defaults: LayoutRetouchConfig
    references: list[Path]  # photos offered in the page (the toy world's, or --reference)
    example_prompt: str
    out: Path  # where every PNG the page shows is written
    title: str = "Layout-and-Retouch"

    @property
    def token(self) -> str | None:
        return self.pipe.models.token

    def reference_name(self, path: Path) -> str:
        """The offered photo a file is a copy of (the page uploads copies), else the file's own name."""
        digest = _file_digest(path)
        for offered in self.references:
            if _file_digest(offered) == digest:
                return str(offered)
        return path.name


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class Request:
    """One press of Generate, checked."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    num_images: int
    config: LayoutRetouchConfig  # for "compare rows", method V's (I reuses it with method I)
    reference: Path | None
    compare: bool = False
    show_masks: bool = False

    @property
    def calls(self) -> int:
        return len(self.prompts) * len(self.seeds) * (2 if self.compare else 1)


@dataclass
class Tile:
    """One image of the gallery: its PNG (parameters inside) and its caption."""

    path: Path
    caption: str
    kind: str  # final, layout, mask_<name>, reference_reconstruction
    method: str
    row: tuple[str, int, int]  # (prompt, seed, index): the gallery shows a row per image


@dataclass
class Progress:
    """The current step, as the page's bar shows it."""

    fraction: float
    text: str


def parse_seeds(text: str | None) -> tuple[int, ...]:
    parts = [p.strip() for p in str(text or "").replace(" ", ",").split(",") if p.strip()]
    try:
        seeds = tuple(dict.fromkeys(int(p) for p in parts))
    except ValueError as err:
        raise LayoutRetouchError(f"seeds must be integers separated by commas, got {text!r}") from err
    if not seeds:
        raise LayoutRetouchError("no seed: write one or more integers, e.g. 42 or 42, 43")
    if any(s < 0 or s >= 2**63 for s in seeds):
        raise LayoutRetouchError("seeds must lie in [0, 2^63)")
    return seeds


def parse_vanilla_steps(value) -> int | float:
    """T_l as the page's number box gives it: a count of steps (5) or, below 1, a fraction of them (0.1)."""
    value = _real("T_l", value)
    if value < 0:
        raise LayoutRetouchError(f"T_l must not be negative, got {value:g}")
    return int(value) if value.is_integer() else value


def _real(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise LayoutRetouchError(f"{name} must be a number, got {value!r}") from err
    if not math.isfinite(number):
        raise LayoutRetouchError(f"{name} must be a finite number, got {value!r}")
    return number


def _whole(name: str, value, minimum: int = 0) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not number.is_integer() or number < minimum:
        raise LayoutRetouchError(f"{name} must be a whole number of at least {minimum}, got {value!r}")
    return int(number)


def make_request(models: WebModels, *, prompts: str, seeds: str, num_images=1, method: str = "V",
                 vanilla_steps=None, ref_start_step=None, mask_start_step=None, tau=None, steps=None,
                 guidance=None, target_start=None, reference: str | Path | None = None, compare: bool = False,
                 show_masks: bool = False) -> Request:
    """The page's fields as a checked request; a LayoutRetouchError names the first problem for the page."""
    lines = tuple(dict.fromkeys(line.strip() for line in str(prompts or "").splitlines() if line.strip()))
    if not lines:
        hint = f" with the token {models.token!r}" if models.token else ""
        raise LayoutRetouchError(f"no prompt: write one per line{hint}, e.g. {models.example_prompt!r}")
    for line in lines:
        models.pipe.derive_prompts(line)  # the pipeline's own check: the token is there, a class word is known
    defaults = models.defaults
    changes = {"method": "V" if compare else method}
    if steps is not None:
        changes["num_inference_steps"] = _whole("steps", steps, 1)
    if guidance is not None:
        changes["guidance_scale"] = _real("guidance", guidance)
    if vanilla_steps is not None:
        changes["vanilla_steps"] = parse_vanilla_steps(vanilla_steps)
    if ref_start_step is not None:
        changes["ref_start_step"] = _whole("S_ref", ref_start_step)
    changes["mask_start_step"] = None if mask_start_step in (None, "") else _whole("S_mask", mask_start_step)
    if tau is not None:
        changes["tau"] = _real("tau", tau)
    if target_start is not None:
        changes["target_start"] = target_start  # the config names a bad value
    if changes["method"] not in METHODS:
        raise LayoutRetouchError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    config = defaults.replace(**changes)  # its own checks (T_l within the steps, tau in [0, 1)) run here
    count = _whole("number of images", num_images, 1)
    if count > MAX_IMAGES:
        raise LayoutRetouchError(f"at most {MAX_IMAGES} images per prompt and seed, got {count}")
    path = Path(reference) if reference else None
    if config.uses_reference:
        if path is None:
            rows = "compare rows (its row V)" if compare else f"method {config.method}"
            raise LayoutRetouchError(f"{rows} borrows the subject's appearance from a reference photo: upload one "
                                     "or pick one of the photos below it, or choose method I or II")
        load_reference_image(path, (8, 8))  # unreadable or empty: ImageInputError, before any model runs
    return Request(lines, parse_seeds(seeds), count, config, path if config.uses_reference else None, compare,
                   show_masks)


class WebEngine:
    """Runs one request at a time through the pipeline; `stop()` ends it between two steps."""

    def __init__(self, models: WebModels):
        self.models = models
        self._stop = threading.Event()
        self._busy = threading.Lock()
        self._runs = itertools.count(1)

    @property
    def busy(self) -> bool:
        return self._busy.locked()

    def stop(self) -> bool:
        """Ask the running generation to end after its current step; False when none runs."""
        if not self.busy:
            return False
        self._stop.set()
        return True

    def run_folder(self) -> Path:
        """A new folder per run, so no result of the page is ever replaced."""
        while True:
            folder = self.models.out / f"run{next(self._runs):04d}"
            try:
                folder.mkdir(parents=True)
                return folder
            except FileExistsError:
                continue

    def generate(self, request: Request, report: Callable[[Progress], None] = lambda p: None
                 ) -> Iterator[list[Tile]]:
        """Run the request, yielding the gallery so far after each pipeline call; Stopped ends it early."""
        if not self._busy.acquire(blocking=False):
            raise LayoutRetouchError("another generation is running: wait for it, or press Stop")
        pipe = self.models.pipe
        try:
            self._stop.clear()
            folder = self.run_folder()
            reference = self.models.reference_name(request.reference) if request.reference else None
            tiles: list[Tile] = []
            # "Compare rows" shows I, II and V on one seed; II is V's own Stage 1 (the layout, which is row II's
            # output), so it costs no run of its own.
            methods = ("I", "V") if request.compare else (request.config.method,)
            jobs = [(p, s, m) for p in request.prompts for s in request.seeds for m in methods]
            for number, (prompt, seed, method) in enumerate(jobs, start=1):
                label = f"run {number}/{len(jobs)} (method {method}, seed {seed})"
                config = request.config.replace(method=method)
                pipe.progress = self._reporter(report, label, number - 1, len(jobs), config)
                generator = torch.Generator("cpu").manual_seed(seed)  # as `generate` seeds each call
                result = pipe(prompt, reference_image=request.reference if config.uses_reference else None,
                              config=config, num_images_per_prompt=request.num_images, generator=generator)
                tiles += self.write(folder, request, result, prompt, seed, reference, config)
                if not request.compare or method == "V":
                    yield self.arrange(tiles, request)
        finally:
            pipe.progress = False
            self._stop.clear()
            self._busy.release()

    def _reporter(self, report: Callable[[Progress], None], label: str, done_runs: int, runs: int,
                  config: LayoutRetouchConfig):
        """The pipeline's step callback: checks Stop, and moves the page's bar over all runs and stages."""
        # The stages a row runs, for an even bar (the pipeline names each step's stage; this only counts them):
        # Stage 1 unless row III, Stage 2 for the rows with a reference. The reference's inversion, when it
        # has steps of its own, keeps the bar where it is.
        stages = [s for s, runs_it in (("stage 1 layout", config.method != "III"),
                                       ("stage 2 retouch", config.uses_reference)) if runs_it]
        shown = [done_runs / runs]

        def progress(stage: str, done: int, total: int) -> None:
            if self._stop.is_set():
                raise Stopped(f"during {label}, {stage} step {done}/{total}")
            if stage in stages and total > 0:
                within = (stages.index(stage) + done / total) / len(stages)
                shown[0] = max(shown[0], (done_runs + within) / runs)
            report(Progress(shown[0], f"{label}: {stage}, step {done}/{total}"))

        return progress

    def write(self, folder: Path, request: Request, result: LayoutRetouchOutput, prompt: str, seed: int,
              reference: str | None, config: LayoutRetouchConfig) -> list[Tile]:
        """Each image of a call as a PNG with the parameters `generate` writes (and which picture it is)."""
        args = argparse.Namespace(**vars(self.models.model_args), num_images=request.num_images)
        digest = _file_digest(request.reference) if config.uses_reference else None
        key = image_key(args, config, digest)
        base = {"prompt": prompt, "seed": seed, "prompts": vars(result.prompts), "config": result.config,
                "models": self.models.pipe.models.sources, "reference": reference}
        where = folder / prompt_folder(prompt)
        where.mkdir(parents=True, exist_ok=True)
        tiles = []

        def add(image: Image.Image, i: int, kind: str, caption: str) -> None:
            path = where / f"seed{seed}_{i}_{config.method}_{kind}.png"
            parameters = {**base, "index": i, OUTPUT_KEY: {"prompt": prompt, "seed": seed, "index": i, **key}}
            if kind != "final":
                parameters["image"] = kind
            save_png(image, path, parameters)
            where_from = f" · seed {seed}" + (f" #{i}" if request.num_images > 1 else "")
            if len(request.prompts) > 1:
                where_from += f" · {prompt}"
            tiles.append(Tile(path, caption + where_from, kind, config.method, (prompt, seed, i)))

        for i, image in enumerate(result.images):
            if config.uses_layout_path and result.layout_images:
                add(result.layout_images[i], i, "layout", "II: layout" if request.compare else "layout (Stage 1)")
            add(image, i, "final", config.method if request.compare else f"{config.method}: final")
            if not request.show_masks:
                continue
            if result.reference_image is not None and not request.compare:
                add(result.reference_image, i, "reference", "reference (as the model saw it)")
            if result.reference_reconstruction is not None:
                add(result.reference_reconstruction, i, "reference_reconstruction", "reference reconstruction")
            for name in MASKS:
                if name in result.masks:
                    add(mask_image(result.masks[name][i], image.size), i, f"mask_{name}", f"mask {name}")
        return tiles

    @staticmethod
    def arrange(tiles: list[Tile], request: Request) -> list[Tile]:
        """The gallery's order: the tiles of one image together; in compare mode I, II and V side by side
        (then V's reconstruction and masks)."""
        if not request.compare:
            return list(tiles)
        rows: dict[tuple, list[Tile]] = {}
        for tile in tiles:
            rows.setdefault(tile.row, []).append(tile)
        first = {("I", "final"): 0, ("V", "layout"): 1, ("V", "final"): 2}
        arranged = []
        for row in rows.values():
            arranged += sorted(row, key=lambda t: first.get((t.method, t.kind), 3))  # stable: the rest keep order
        return arranged


@dataclass
class Outcome:
    """What the page shows after a press of Generate: the gallery, the files to download and one message."""

    tiles: list[Tile] = field(default_factory=list)
    message: str = ""
    ok: bool = True
    seconds: float = 0.0

    @property
    def columns(self) -> int:
        """The gallery's columns: an image's tiles fill whole rows (up to 4 a row; with the masks, 8 tiles in
        two rows); images of a single tile share rows."""
        if not self.tiles:
            return 2
        per_image = sum(1 for t in self.tiles if t.row == self.tiles[0].row)
        return min(4, len(self.tiles)) if per_image == 1 else min(per_image, 4)

    @property
    def images(self) -> int:
        return sum(1 for t in self.tiles if t.kind == "final")


def run_request(engine: WebEngine, fields: dict, report: Callable[[Progress], None] = lambda p: None
                ) -> Iterator[Outcome]:
    """The Generate button end to end: every failure becomes one message, never a traceback."""
    start = time.perf_counter()
    tiles: list[Tile] = []
    try:
        request = make_request(engine.models, **fields)
        for tiles in engine.generate(request, report):
            done = Outcome(tiles).images
            yield Outcome(tiles, f"Working: {done} of {request.calls * request.num_images} image(s) made...",
                          seconds=time.perf_counter() - start)
        seconds = time.perf_counter() - start
        yield Outcome(tiles, f"Done: {Outcome(tiles).images} image(s) in {seconds:.1f} s.", seconds=seconds)
    except Stopped as stop:
        seconds = time.perf_counter() - start
        yield Outcome(tiles, f"Stopped {stop}; {Outcome(tiles).images} finished image(s) kept.", seconds=seconds)
    except (LayoutRetouchError, FileNotFoundError) as err:  # ImageInputError and PromptError among them
        yield Outcome(tiles, f"Error: {err}", ok=False, seconds=time.perf_counter() - start)
    except Exception as err:  # the page shows one line; the server's log keeps the traceback
        logger.exception("generation failed")
        yield Outcome(tiles, f"Error: unexpected {type(err).__name__}: {err} (details in the server's log)", ok=False,
                      seconds=time.perf_counter() - start)
