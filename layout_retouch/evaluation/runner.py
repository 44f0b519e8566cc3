"""The resumable, sharded evaluation run: generate every missing image, score every unscored one,
then (main process) gather all records and write the report.

Resuming needs no state file: an image exists or not (each is renamed into place whole), and a
score record exists with the current metric settings or not. Work is split between processes
with accelerate: `accelerate launch --num_processes N` on GPUs, `torchrun --nproc_per_node N` on
CPUs (gloo); a single plain process is the one-process case.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from layout_retouch.config import LayoutRetouchConfig
from layout_retouch.errors import ImageInputError
from layout_retouch.evaluation.aggregate import ImageResult, aggregate
from layout_retouch.evaluation.generation import GenerationRequest, ImageGenerator
from layout_retouch.evaluation.jobs import Job, seed_batches
from layout_retouch.evaluation.report import write_report
from layout_retouch.evaluation.scoring import MetricSettings, MetricSuite
from layout_retouch.evaluation.storage import (
    INFO_KEY,
    load_record,
    read_record_metadata,
    remove_stale_temps,
    save_image_atomic,
    save_record_atomic,
)
from layout_retouch.metrics.inception_score import DEFAULT_IS_SPLITS
from layout_retouch.metrics.loading import process_state
from layout_retouch.outputs import image_config

SIGNATURE_KEY = "metric_settings"


@dataclass
class RunOptions:
    out_dir: Path
    base_config: LayoutRetouchConfig = field(default_factory=LayoutRetouchConfig)
    metrics: MetricSettings | None = field(default_factory=MetricSettings)  # None: generate only
    is_splits: int = DEFAULT_IS_SPLITS
    umap: bool = False
    progress: bool = True
    # Seeds of one concept, method and prompt made in one call, where the generator takes batches
    # (`generate_batch`): on a GPU more images per second; images differ from one-seed calls by float
    # rounding only. 1 (one image per call) keeps a run's images bit-identical to earlier runs'.
    batch_size: int = 1


@dataclass
class RunResult:
    tables: dict[str, list[dict]]
    files: dict[str, Path]
    generated: int  # images made by this process in this run
    scored: int


def _job_info(job: Job, out_dir: Path) -> dict:
    return {
        "method": job.method,
        "personalization": job.concept.personalization,
        "concept": job.concept.name,
        "prompt_set": job.prompt_set,
        "prompt_index": job.prompt_index,
        "template": job.template,
        "seed": job.seed,
        "image": str(job.image_path(out_dir).relative_to(out_dir)),
    }


def _record_current(job: Job, out_dir: Path, signature: str) -> bool:
    path = job.record_path(out_dir)
    if not path.is_file():
        return False
    try:
        return read_record_metadata(path).get(SIGNATURE_KEY) == signature
    except Exception:  # a damaged record is rescored
        return False


def _recorded_info(path: Path) -> dict | None:
    """The parameters saved in a generated image (None: none recorded, e.g. an image put there by hand)."""
    try:
        with Image.open(path) as im:
            return json.loads(im.info.get(INFO_KEY) or "null")
    except (OSError, ValueError):
        return None  # unreadable: reported when it is scored


def _check_existing(jobs: Sequence[Job], out_dir: Path, base_config: LayoutRetouchConfig | None) -> None:
    """Refuse, before any work, an existing image made for another prompt, seed or config: its file name
    (prompt index, seed) alone does not say it is this job's, and resuming must not take it for one."""
    for job in jobs:
        path = job.image_path(out_dir)
        info = _recorded_info(path) if path.is_file() else None
        if not isinstance(info, dict):
            continue
        wanted = {"prompt": job.prompt, "seed": job.seed, "method": job.method}
        got = {k: info.get(k) for k in wanted}
        if base_config is not None and isinstance(info.get("config"), dict):
            wanted["config"] = image_config(base_config.replace(method=job.method).to_dict())
            got["config"] = image_config(info["config"])
        differ = [k for k in wanted if got[k] != wanted[k]]
        if differ:
            raise ImageInputError(
                f"{path} was made with another {' and '.join(differ)} than this run asks for; pass another "
                "--out, or delete the images to redo them"
            )


def _open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as err:
        raise ImageInputError(
            f"generated image {str(path)!r} cannot be read ({err}); delete it to redo it"
        ) from None


def run_evaluation(
    jobs: Sequence[Job], generator: ImageGenerator | None, options: RunOptions
) -> RunResult | None:
    """Run `jobs`; returns the result on the main process, None on the others."""
    state = process_state()
    out_dir = Path(options.out_dir)
    settings = options.metrics
    signature = settings.signature() if settings else ""
    if settings is not None:
        MetricSuite(settings).check_available()
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out_dir)
    _check_existing(jobs, out_dir, options.base_config if generator is not None else None)
    state.wait_for_everyone()

    def finished(job: Job) -> bool:
        return job.image_path(out_dir).is_file() and (
            settings is None or _record_current(job, out_dir, signature)
        )

    todo = [j for j in jobs if not finished(j)]
    state.wait_for_everyone()  # every process sees the same list before anyone writes
    generated = scored = 0
    with state.split_between_processes(todo) as mine:
        to_generate = [j for j in mine if not j.image_path(out_dir).is_file()]
        to_score = list(mine) if settings else []
        if to_generate and generator is None:
            raise ImageInputError(
                f"{len(to_generate)} images are missing under {out_dir} and nothing generates them: "
                "pass --base (the Layout-and-Retouch pipeline) or --generator module:callable"
            )
        bar = tqdm(
            total=len(to_generate) + len(to_score),
            desc=f"evaluate [{state.process_index + 1}/{state.num_processes}]"
            if state.num_processes > 1
            else "evaluate",
            disable=not options.progress or not state.is_main_process,
            unit="step",
        )
        batched = hasattr(generator, "generate_batch")
        for batch in seed_batches(to_generate, options.batch_size if batched else 1):
            job, seeds = batch[0], [j.seed for j in batch]  # the seeds of one call: a batch rounds differently
            bar.set_postfix_str(f"generate {job.method} {job.concept.name} p{job.prompt_index} "
                                f"s{','.join(map(str, seeds))}")
            config = options.base_config.replace(method=job.method)
            requests = [GenerationRequest(j.concept, j.method, j.prompt, j.seed, config) for j in batch]
            images = generator.generate_batch(requests) if batched else [generator(requests[0])]
            for job, image in zip(batch, images, strict=True):  # each written whole, as soon as it exists
                info = {**_job_info(job, out_dir), "prompt": job.prompt, "config": config.to_dict(),
                        "seeds_in_call": seeds}
                save_image_atomic(image, job.image_path(out_dir), info)
                generated += 1
                bar.update()
        if to_score:
            if hasattr(generator, "release"):
                generator.release()  # the metric models get the memory
            suite = MetricSuite(settings)
            suite.load_all()
            for job in to_score:
                bar.set_postfix_str(f"score {job.method} {job.concept.name} p{job.prompt_index} s{job.seed}")
                arrays = suite.score(job, _open_image(job.image_path(out_dir)))
                meta = {SIGNATURE_KEY: signature, "job": json.dumps(_job_info(job, out_dir), sort_keys=True)}
                save_record_atomic(arrays, meta, job.record_path(out_dir))
                scored += 1
                bar.update()
        bar.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return _gather_and_report(jobs, options, generated, scored)


def _gather_and_report(jobs: Sequence[Job], options: RunOptions, generated: int, scored: int) -> RunResult:
    """Main process: read every job's record (all processes wrote to the shared output folder)."""
    out_dir = Path(options.out_dir)
    settings = options.metrics
    if settings is None:
        return RunResult({}, {}, generated, scored)
    results = []
    embeddings: dict[tuple[str, str], list] = defaultdict(list)
    for job in jobs:
        arrays, _ = load_record(job.record_path(out_dir))
        results.append(ImageResult(_job_info(job, out_dir), arrays))
        if options.umap and "clip_embedding" in arrays:
            embeddings[(job.prompt_set, job.method)].append(arrays["clip_embedding"])
    tables = aggregate(results, options.is_splits)
    for name in ("prompts", "concepts", "methods"):  # the IS backend travels with every IS number
        for row in tables[name]:
            row["inception_backend"] = settings.inception_label if "inception" in settings.metrics else ""
    files = write_report(
        tables,
        out_dir,
        settings.inception_label,
        settings.preference,
        settings.protocol,
        embeddings=embeddings if options.umap else None,
    )
    return RunResult(tables, files, generated, scored)


def summary_line(result: RunResult) -> str:
    rows = result.tables.get("methods", [])
    parts = []
    for r in rows:
        vals = ", ".join(f"{k}={r[k]:.3f}" for k in ("clip_i", "dino", "clip_t") if not math.isnan(r[k]))
        parts.append(f"{r['prompt_set']} {r['personalization']}/{r['method']}: {vals}")
    return "\n".join(parts)
