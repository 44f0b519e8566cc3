"""`layout-retouch evaluate`: methods x concepts x prompts x seeds, generated then scored, resumable.

Shard across GPUs with `accelerate launch --num_processes N -m layout_retouch.cli evaluate ...`,
across CPU processes with `torchrun --nproc_per_node N -m layout_retouch.cli evaluate ...`;
rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layout_retouch.cli.options import (
    SEED_MAX,
    add_threads_option,
    check_device,
    check_model_paths,
    check_output_folder,
    check_segmenter_available,
    parse_seed_list,
    quiet_libraries,
    read_config_file,
    set_threads,
)
from layout_retouch.config import LayoutRetouchConfig
from layout_retouch.errors import LayoutRetouchError
from layout_retouch.metrics.defaults import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_DETECTOR_MODEL,
    DEFAULT_DINO_MODEL,
    DEFAULT_IS_CLASSIFIER,
    DEFAULT_IS_SPLITS,
    DEFAULT_PICKSCORE_MODEL,
    DEFAULT_PICKSCORE_PROCESSOR,
    IS_BACKENDS,
    METRIC_FAMILIES,
    PREFERENCE_METRICS,
)
from layout_retouch.metrics.protocols import PROTOCOLS

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # torch's names
# The paper generates 8 images per concept and prompt.
DEFAULT_SEEDS = "8"


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_seeds(text: str) -> list[int]:
    """`8` -> seeds 0..7; `0,3,9` -> those seeds."""
    if "," in text:
        return parse_seed_list(text)
    try:
        count = int(text)
    except ValueError:
        raise LayoutRetouchError(f"--seeds takes a count (8) or a list (0,3,9), got {text!r}") from None
    if not 1 <= count <= SEED_MAX + 1:
        raise LayoutRetouchError(f"--seeds as a count must lie in 1..2^64, got {count}")
    return list(range(count))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="generate and score methods over concepts, prompt sets and seeds (resumable)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--concepts", nargs="+", required=True, help="concept folders, or folders of them")
    p.add_argument("--out", required=True, help="output folder (images, scores, tables, plots)")
    p.add_argument("--base", help="base model: hub id, diffusers folder or single file (for generation)")
    p.add_argument("--methods", default="I,V", help="ablation rows I..V or their names, and the baselines freeu, "
                   "magicfusion, dreammatcher, comma-separated")
    p.add_argument(
        "--prompts",
        default="normal",
        help="prompt sets, comma-separated: normal, challenging (live/object picked per concept), "
        "normal_live, normal_nonlive, challenging_live, challenging_nonlive, or a text file of templates",
    )
    p.add_argument("--seeds", default=DEFAULT_SEEDS, help="a count (8: seeds 0..7) or a list (0,3,9)")
    p.add_argument("--limit", type=int, help="only the first N images (a quick look)")
    p.add_argument(
        "--generator", help="package.module:callable taking a GenerationRequest, instead of the pipeline"
    )
    p.add_argument("--config", help="JSON file of LayoutRetouchConfig values (method is set per run)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the config's 50)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="seeds of one prompt per pipeline call (faster on GPUs; images then differ from one-seed "
        "calls by float rounding); default 1",
    )
    p.add_argument("--device", default="auto", help="auto (accelerate's device per process), cpu, cuda, mps")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    m = p.add_argument_group("metrics")
    m.add_argument(
        "--metrics", default=",".join(METRIC_FAMILIES), help="metric families, or 'none' (generate only)"
    )
    m.add_argument(
        "--protocol",
        choices=sorted(PROTOCOLS),
        default="clean",
        help="preprocessing (see metrics/protocols.py)",
    )
    m.add_argument("--preference", choices=PREFERENCE_METRICS, default="pickscore")
    m.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL)
    m.add_argument("--dino-model", default=DEFAULT_DINO_MODEL)
    m.add_argument("--pickscore-model", default=DEFAULT_PICKSCORE_MODEL)
    m.add_argument("--pickscore-processor", default=DEFAULT_PICKSCORE_PROCESSOR)
    m.add_argument("--detector-model", default=DEFAULT_DETECTOR_MODEL)
    m.add_argument("--is-backend", choices=IS_BACKENDS, default="auto")
    m.add_argument(
        "--is-classifier", default=DEFAULT_IS_CLASSIFIER, help="used when torch-fidelity is missing"
    )
    m.add_argument("--is-splits", type=int, default=DEFAULT_IS_SPLITS)
    m.add_argument(
        "--umap", action="store_true", help="also plot a UMAP of CLIP embeddings (needs umap-learn)"
    )
    p.add_argument("--no-progress", action="store_true")
    add_threads_option(p)
    p.set_defaults(func=run, resume_hint="rerun the same command to resume", checks_first=True)


def _base_config(args) -> LayoutRetouchConfig:
    data = read_config_file(args.config) if args.config else {}
    if args.steps is not None:
        data["num_inference_steps"] = args.steps
    if args.guidance is not None:
        data["guidance_scale"] = args.guidance
    return LayoutRetouchConfig.from_dict(data)


def _metric_settings(args):
    from layout_retouch.evaluation.scoring import MetricSettings

    metrics = _csv(args.metrics)
    if metrics == ["none"]:
        return None
    return MetricSettings(
        metrics=tuple(metrics),
        protocol=args.protocol,
        clip_model=args.clip_model,
        dino_model=args.dino_model,
        preference=args.preference,
        pickscore_model=args.pickscore_model,
        pickscore_processor=args.pickscore_processor,
        is_backend=args.is_backend,
        is_classifier=args.is_classifier,
        detector_model=args.detector_model,
        device=args.device,
    )


def run(args) -> int:
    from layout_retouch.evaluation.concepts import load_concepts
    from layout_retouch.evaluation.generation import PipelineGenerator, import_generator
    from layout_retouch.evaluation.jobs import build_jobs
    from layout_retouch.evaluation.runner import RunOptions, run_evaluation, summary_line

    if args.batch_size < 1:
        raise LayoutRetouchError(f"--batch-size must be 1 or more, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise LayoutRetouchError(f"--limit must be 1 or more, got {args.limit}")
    check_device(args.device, allow_auto=True)
    check_output_folder(args.out)
    base_config = _base_config(args)
    concepts = load_concepts(args.concepts)
    jobs = build_jobs(_csv(args.methods), concepts, _csv(args.prompts), parse_seeds(args.seeds), args.limit)
    settings = _metric_settings(args)
    if not args.generator and args.base:  # the pipeline generates: what it loads must exist
        check_model_paths({"--base": args.base})
        for concept in concepts:
            if concept.weights is not None and not Path(concept.weights).exists():
                raise LayoutRetouchError(f"concept {concept.name}: its weights {concept.weights} do not exist")
        for method in dict.fromkeys(job.method for job in jobs):
            check_segmenter_available(base_config.replace(method=method))
    set_threads(args.threads)
    quiet_libraries(args.no_progress)
    if args.generator:
        generator = import_generator(args.generator)
    elif args.base:
        import torch

        from layout_retouch.metrics.loading import resolve_device

        generator = PipelineGenerator(args.base, resolve_device(args.device), getattr(torch, DTYPES[args.dtype]))
    else:
        generator = None  # scoring existing images only; missing ones are an error
    options = RunOptions(
        out_dir=Path(args.out),
        base_config=base_config,
        metrics=settings,
        is_splits=args.is_splits,
        umap=args.umap,
        progress=not args.no_progress,
        batch_size=args.batch_size,
    )
    result = run_evaluation(jobs, generator, options)
    if result is not None:
        print(f"{len(jobs)} images; generated {result.generated}, scored {result.scored} in this process")
        if result.files:
            print(summary_line(result))
            print(f"tables: {result.files['table']}  per image: {result.files['images']}")
    return 0
