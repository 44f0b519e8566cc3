"""`layout-retouch generate`: prompts x seeds through the pipeline, each result saved with its parameters.

Every input is checked before a model is loaded; the heavy imports wait for `run`, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

from layout_retouch.cli.options import (
    HelpFormatter,
    add_method_options,
    add_model_options,
    add_threads_option,
    check_device,
    check_model_options,
    check_output_folder,
    config_from_args,
    parse_seed_list,
    quiet_libraries,
    set_threads,
)
from layout_retouch.errors import LayoutRetouchError, PromptError
from layout_retouch.outputs import (
    OUTPUT_KEY,
    check_not_overwriting,
    digest,
    image_config,
    is_finished,
    mask_image,
    prompt_folder,
    save_png,
    save_result,
)
from layout_retouch.prompts import derive_prompts


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images of the personal subject with Layout-and-Retouch",
                       formatter_class=HelpFormatter)
    add_model_options(p)
    add_method_options(p)
    g = p.add_argument_group("job")
    g.add_argument("--prompt", action="append", default=[], help="a prompt with the token (repeatable)")
    g.add_argument("--prompt-file", help="a file with one prompt per line; {} stands for '<token> <class>'")
    g.add_argument("--reference", help="reference photo of the subject (needed by methods III-V)")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--seeds", default="42", help="comma-separated seeds (paper: 42)")
    g.add_argument("--num-images", type=int, default=1, help="images per prompt and seed, in one batch")
    g.add_argument("--save-intermediates", action="store_true",
                   help="also write layout, reference reconstruction, masks and attention maps")
    g.add_argument("--skip-existing", action="store_true",
                   help="resume: keep finished results made with the same parameters")
    g.add_argument("--overwrite", action="store_true", help="replace finished results")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    add_threads_option(g)
    p.set_defaults(func=run, checks_first=True)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise LayoutRetouchError(f"prompt file {path} does not exist")
        subject = f"{args.token} {args.class_word}" if args.token else args.class_word or ""
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise LayoutRetouchError(f"prompt file {path} is not UTF-8 text ({err.reason})") from None
        prompts += [line.strip().replace("{}", subject) for line in lines if line.strip()]
    if not prompts:
        raise LayoutRetouchError("no prompt: pass --prompt or --prompt-file")
    return prompts


def _source(value: str | None) -> str | None:
    """A model given as a local path is keyed by its absolute path (a hub id stays as given)."""
    return str(Path(value).resolve()) if value and Path(value).exists() else value


def file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def image_key(args, config, reference_digest: str | None) -> dict:
    """What makes an image besides its prompt, seed and index: the models, the method's values (T_l and
    S_mask resolved, so 0.1 of 50 steps and 5 steps are one key) and the reference photo's content."""
    method = image_config(config.to_dict())
    method.update(vanilla_steps=config.num_vanilla_steps, mask_start_step=config.mask_start)
    models = {"base": _source(args.base), "base_config": _source(args.base_config),
              "personalized": _source(args.personalized), "personalization": args.personalization,
              "token": args.token, "class_word": args.class_word, "dtype": args.dtype,
              **({"vae": _source(args.vae)} if getattr(args, "vae", None) else {})}  # keys without --vae unchanged
    return {"models": models, "config": method,
            "reference": reference_digest if config.uses_reference else None, "num_images": args.num_images}


def plan_outputs(out: Path, prompts: list[str], seeds: list[int], key: dict) -> list[tuple[str, int, dict]]:
    """Every (prompt, seed) with its files and their output keys: a folder per exact prompt, a file per
    seed and index, named by a digest of the parameters, so no two results can share a name."""
    suffix = digest(key, 8)
    jobs = []
    for prompt in dict.fromkeys(prompts):
        folder = out / prompt_folder(prompt)
        for seed in dict.fromkeys(seeds):
            files = {folder / f"seed{seed}_{i}-{suffix}.png": {"prompt": prompt, "seed": seed, "index": i, **key}
                     for i in range(key["num_images"])}
            jobs.append((prompt, seed, files))
    return jobs


def warn(message: str) -> None:
    print(f"layout-retouch generate: warning: {message}", file=sys.stderr)


def check_inputs(args):
    """Every check that needs no model: (prompts, seeds, config, reference digest), or one clear error."""
    prompts = read_prompts(args)
    seeds = parse_seed_list(args.seeds)
    if args.num_images < 1:
        raise LayoutRetouchError(f"--num-images must be 1 or more, got {args.num_images}")
    config = config_from_args(args)
    check_model_options(args)
    if args.token:
        for prompt in prompts:
            derive_prompts(prompt, args.token, args.class_word or "")
    check_device(args.device)
    check_output_folder(args.out)
    reference_digest = None
    if config.uses_reference:
        from layout_retouch.inversion import load_reference_image

        if not args.reference:
            raise LayoutRetouchError(f"method {config.method} needs --reference (a photo of the subject)")
        load_reference_image(args.reference, (8, 8))
        reference_digest = file_digest(args.reference)
    return prompts, seeds, config, reference_digest


def check_prompt_lengths(pipe, prompts: list[str], token: str | None) -> None:
    """The text encoder reads a fixed number of tokens: a longer prompt loses its end (a warning), and a
    personal token beyond that limit would be lost entirely (an error: the subject would not be drawn)."""
    models = pipe.models
    tokenizer, limit = models.tokenizer, models.tokenizer.model_max_length
    for prompt in prompts:
        expanded = models.expand_prompt(prompt)
        count = len(tokenizer(expanded).input_ids)
        if count <= limit:
            continue
        match = re.search(re.escape(models.expand_prompt(token)), expanded, re.IGNORECASE) if token else None
        if match and len(tokenizer(expanded[: match.end()]).input_ids) > limit - 1:  # the end token stays
            raise PromptError(
                f"the personal token {token!r} lies beyond the text encoder's {limit - 2}-token limit in "
                f"{prompt!r}; move it forward or shorten the prompt"
            )
        kept = tokenizer.decode(tokenizer(expanded, truncation=True, max_length=limit).input_ids,
                                skip_special_tokens=True)
        warn(f"prompt {prompt!r} has {count - 2} tokens; the text encoder reads the first {limit - 2} "
             f"(up to {' '.join(kept.split()[-3:])!r}), the rest is dropped")


def run(args) -> int:
    prompts, seeds, config, reference_digest = check_inputs(args)
    out = Path(args.out)
    jobs = plan_outputs(out, prompts, seeds, image_key(args, config, reference_digest))
    todo = set(check_not_overwriting({p: k for _, _, files in jobs for p, k in files.items()}, args.overwrite,
                                     args.skip_existing))
    jobs = [job for job in jobs if any(p in todo for p in job[2])]
    if not jobs:
        print(f"nothing to do: every result is already in {out}")
        return 0
    set_threads(args.threads)
    quiet_libraries(args.quiet)
    import torch
    from tqdm.auto import tqdm

    from layout_retouch.pipeline import load_pipeline_from_args
    from layout_retouch.segmenters import load_segmenter

    segmenter = None
    if config.uses_mask_blending:  # SAM fails without a hub or a local copy: before Stage 1, not after it
        segmenter = load_segmenter(config.segmenter, config.sam_model if config.segmenter == "sam" else None,
                                   args.device)
    pipe = load_pipeline_from_args(args)
    if segmenter is not None:
        pipe._segmenters[config.segmenter] = segmenter
    pipe.progress = not args.quiet
    check_prompt_lengths(pipe, prompts, args.token)
    for side in ("height", "width"):
        value = getattr(config, side)
        if value is not None and value % pipe.vae_scale_factor:
            warn(f"--{side} {value} is not a multiple of {pipe.vae_scale_factor} (the VAE's scale); the image "
                 f"will be {value - value % pipe.vae_scale_factor}")
    written = 0
    already = {path for path in todo if is_finished(path)}  # being replaced (--overwrite)
    # Counted from the disk when asked: a Ctrl-C may land between a file and its count.
    args.resume_hint = lambda: (f"{sum(is_finished(p) for p in todo - already)} results written, rerun with "
                                "--skip-existing")
    for prompt, seed, files in tqdm(jobs, desc="generate", disable=args.quiet):
        generator = torch.Generator("cpu").manual_seed(seed)
        result = pipe(prompt, reference_image=args.reference, config=config, num_images_per_prompt=len(files),
                      generator=generator, save_intermediates=args.save_intermediates)
        base = {"prompt": prompt, "seed": seed, "prompts": vars(result.prompts), "config": result.config,
                "models": pipe.models.sources, "reference": args.reference}
        for i, (image, (path, key)) in enumerate(zip(result.images, files.items(), strict=True)):
            save_result(image, path, {**base, "index": i, OUTPUT_KEY: key})
            if args.save_intermediates:
                write_intermediates(result, i, path)
            written += 1
    print(f"wrote {written} image(s) to {out}")
    return 0


def write_intermediates(result, i: int, path: Path) -> None:
    folder = path.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    size = result.images[i].size
    if result.layout_images:
        save_png(result.layout_images[i], folder / "layout.png")
    if result.reference_reconstruction is not None:
        save_png(result.reference_reconstruction, folder / "reference_reconstruction.png")
    for name, masks in result.masks.items():
        save_png(mask_image(masks[i], size), folder / f"mask_{name}.png")
    for role, maps in result.attention_maps.items():
        if maps is None:
            continue
        for step, step_maps in enumerate(maps):
            m = step_maps[min(i, len(step_maps) - 1)]
            m = (m - m.min()) / max(float(m.max() - m.min()), 1e-8)
            save_png(mask_image(m, size), folder / f"attention_{role}_step{step:03d}.png")
