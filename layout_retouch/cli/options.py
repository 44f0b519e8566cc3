"""CLI options shared by the commands that load models and generate."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import types
import typing
from pathlib import Path

from layout_retouch.config import METHOD_NAMES, LayoutRetouchConfig
from layout_retouch.errors import LayoutRetouchError
from layout_retouch.evaluation.concepts import WEIGHT_KINDS as KINDS  # models.KINDS, without importing torch

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where the help does not already say its default and there is one to say."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse's errors as one line (its default prints the whole usage first), exit code 2 as before."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _thread_count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (torch's default) or more, got {value}")
    return value


def add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_thread_count, default=None,
                   help="torch CPU threads (0: torch's default; default: the cores idle when the command "
                   "starts, at least 1: on this project's 2-core machine two threads ran a toy benchmark "
                   "1.9x faster than one when quiet, and 3-15x slower when another job held a core)")


def add_readout_options(p: argparse.ArgumentParser, *, seeds: int, steps: int, guidance: float = 5.0) -> None:
    """Seeds, steps, guidance, threads and a JSON output: what every toy-world readout script takes."""
    p.add_argument("--seeds", type=int, default=seeds)
    p.add_argument("--steps", type=int, default=steps, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=guidance)
    add_threads_option(p)
    p.add_argument("--out", type=Path, help="write the readings here as JSON")


def idle_cores(sample_seconds: float = 0.5, stat: Path = Path("/proc/stat")) -> int:
    """Cores idle right now, from two reads of /proc/stat (the load average lags by a minute);
    every core where /proc/stat does not exist."""
    cores = os.cpu_count() or 1
    if not stat.exists():
        return cores

    def idle_and_total() -> tuple[int, int]:
        values = [int(v) for v in stat.read_text().split("\n", 1)[0].split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, all

    idle0, total0 = idle_and_total()
    time.sleep(sample_seconds)
    idle1, total1 = idle_and_total()
    idle_share = (idle1 - idle0) / max(total1 - total0, 1)
    return max(1, round(cores * idle_share))


def set_threads(threads: int | None) -> int:
    """Apply --threads (0: torch's own default); None takes the idle cores, so a busy machine is not thrashed."""
    if threads is None:
        threads = idle_cores()
    if threads:
        import torch

        torch.set_num_threads(threads)
    return threads


def quiet_libraries(quiet: bool) -> None:
    """No loading bars from diffusers and transformers (our own bars show the work); with --quiet none
    from downloads either. Imports diffusers (seconds): commands call it after checking their inputs."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def add_model_options(p: argparse.ArgumentParser, base_required: bool = True) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--base", required=base_required,
                   help="base (vanilla) model, SD 1.x/2.x or SDXL: hub id, diffusers folder, or single "
                   ".safetensors file")
    g.add_argument("--base-config", help="config folder or hub id for a single-file base checkpoint")
    g.add_argument("--vae", help="a VAE to use instead of the base's (folder or hub id), e.g. an fp16-fix VAE "
                   "for SDXL in fp16 (otherwise SDXL's VAE runs in fp32)")
    g.add_argument("--personalized", help="DreamBooth folder/file, Textual Inversion or LoRA file/folder, "
                   "Custom Diffusion folder")
    g.add_argument("--personalization", choices=KINDS, help="kind of --personalized (default: detected)")
    g.add_argument("--token", help="the personal token in prompts, e.g. sks or <cat-toy>")
    g.add_argument("--class-word", help="the subject's class word, e.g. dog")
    g.add_argument("--allow-pickle", action="store_true",
                   help="allow pickled .bin/.ckpt weights (loaded with weights_only=True); off by default")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    g.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    g.add_argument("--offload", action="store_true", help="keep models on the CPU until they run (small GPUs)")
    g.add_argument("--fuse-qkv", action="store_true",
                   help="one matmul per attention layer for its projections (faster on GPUs; not with LoRA or "
                   "Custom Diffusion)")
    g.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                   help="torch.compile the UNets (MODE: a torch.compile mode, e.g. max-autotune-no-cudagraphs; "
                   "default: torch's default); the first image pays the compilation")


def add_method_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method (defaults: the paper's, see layout_retouch/config.py)")
    g.add_argument("--config", help="JSON file of LayoutRetouchConfig values; flags below override it")
    g.add_argument("--method", help=f"ablation row: {', '.join(sorted(METHOD_NAMES))} (default V)")
    g.add_argument("--steps", type=int, dest="num_inference_steps", help="DDIM steps (50)")
    g.add_argument("--guidance", type=float, dest="guidance_scale", help="CFG scale (7.5)")
    g.add_argument("--vanilla-steps", type=_count_or_fraction,
                   help="T_l: vanilla steps, a count (5) or a fraction of --steps (0.1)")
    g.add_argument("--ref-start-step", type=int, help="S_ref (4)")
    g.add_argument("--mask-start-step", type=int, help="S_mask (= S_ref)")
    g.add_argument("--tau", type=float, help="cross-attention mask threshold (0.1)")
    g.add_argument("--target-start", choices=("noise", "layout"),
                   help="where Stage 2's target begins: the layout's noise (the paper's, default) or its latent "
                   "after the vanilla steps (for a personalization that the layout's attention cannot steer)")
    g.add_argument("--segmenter", help="sam, none, toy or module:attr (sam)")
    g.add_argument("--sam-model", help="SAM hub id or local folder (facebook/sam-vit-base)")
    g.add_argument("--mask-attention-resolution", type=float, help="cross-attention maps' size / latent (0.25)")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--inversion-cache-dir", help="where reference inversions are cached")


METHOD_FIELDS = ("method", "num_inference_steps", "guidance_scale", "vanilla_steps", "ref_start_step",
                 "mask_start_step", "tau", "target_start", "segmenter", "sam_model", "mask_attention_resolution",
                 "height", "width", "inversion_cache_dir")


def _count_or_fraction(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and ("." not in text) else value


def _type_name(tp) -> str:
    """A config field's type in words, for error messages."""
    origin, params = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in params)
    if origin is typing.Literal:
        return "one of " + ", ".join(json.dumps(a) for a in params)
    if origin is tuple:
        return f"a list of {_type_name(params[0])} values"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null",
             dict: "an object"}
    return names.get(origin or tp, getattr(tp, "__name__", str(tp)))


def _matches(value, tp) -> bool:
    origin, params = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in params)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in params)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_matches(v, params[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (bool, str, type(None)):
        return isinstance(value, tp)
    return True


def read_config_file(path: str | Path) -> dict:
    """A JSON object of LayoutRetouchConfig values, each checked against its field's type: one message naming
    the key and the type expected, before any model is loaded."""
    path = Path(path)
    if not path.is_file():
        raise LayoutRetouchError(f"config file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LayoutRetouchError(f"config file {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise LayoutRetouchError(
            f"config file {path} holds a JSON {type(data).__name__}; it needs an object of LayoutRetouchConfig "
            'values, e.g. {"tau": 0.2}'
        )
    hints = typing.get_type_hints(LayoutRetouchConfig)
    names = {f.name for f in dataclasses.fields(LayoutRetouchConfig)}
    for key, value in data.items():
        if key in names and not _matches(value, hints[key]):
            raise LayoutRetouchError(
                f"config file {path}: {key!r} must be {_type_name(hints[key])}, got {json.dumps(value)}"
            )
    return data


def config_from_args(args) -> LayoutRetouchConfig:
    data = read_config_file(args.config) if getattr(args, "config", None) else {}
    data.update({k: getattr(args, k) for k in METHOD_FIELDS if getattr(args, k, None) is not None})
    config = LayoutRetouchConfig.from_dict(data)
    # S_ref and S_mask are steps of the schedule; their defaults may exceed a short run's (Stage 2 then keeps
    # the layout's attention throughout), but a value asked for beyond the steps is a mistake.
    for key, flag in (("ref_start_step", "--ref-start-step"), ("mask_start_step", "--mask-start-step")):
        value = data.get(key)
        if value is not None and not 0 <= value <= config.num_inference_steps:
            raise LayoutRetouchError(
                f"{flag} (config {key}) must lie in 0..{config.num_inference_steps} (the steps), got {value}"
            )
    return config


def parse_seed_list(text: str, flag: str = "--seeds") -> list[int]:
    """Comma-separated seeds, each a torch seed (0..2^64-1)."""
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise LayoutRetouchError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise LayoutRetouchError(f"{flag} names no seed")
    for seed in seeds:
        if not 0 <= seed <= SEED_MAX:
            raise LayoutRetouchError(f"{flag}: seed {seed} is outside 0..{SEED_MAX} (2^64-1)")
    return seeds


def check_device(name: str, allow_auto: bool = False) -> None:
    """The device exists in this torch build and on this machine (torch's own error comes at the first
    tensor moved, after minutes of loading)."""
    if name == "cpu" or (allow_auto and name == "auto"):
        return  # no need to import torch (seconds) for these
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise LayoutRetouchError(f"--device {name!r} is not a device: give cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise LayoutRetouchError(
                f"--device {name}: this torch build ({torch.__version__}) has no CUDA; install a CUDA build "
                "(see README) or pass --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count or count == 0:
            raise LayoutRetouchError(f"--device {name}: {count} CUDA device(s) visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise LayoutRetouchError(f"--device {name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise LayoutRetouchError(f"--device {name!r}: give cpu, cuda, cuda:N or mps")


def check_segmenter_available(config: LayoutRetouchConfig) -> None:
    """Segment Anything can be loaded: a local folder with its config, or a hub id in the local cache
    when the hub is off (HF_HUB_OFFLINE). Without this, a run fails after its first images (the mask
    is made at the end of Stage 2). With the hub on, the load itself is the check."""
    if not config.uses_mask_blending or config.segmenter != "sam":
        return
    model, hint = config.sam_model, "pass --segmenter none (cross-attention masks only) or --sam-model FOLDER"
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LayoutRetouchError(f"Segment Anything folder {model} has no config.json: {hint}")
        return
    if path.exists() or model.startswith((".", "/", "~")):
        raise LayoutRetouchError(f"Segment Anything {model!r} is not a model folder: {hint}")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "config.json"), str):
            raise LayoutRetouchError(
                f"Segment Anything {model!r} is not in the local cache and the hub is off (HF_HUB_OFFLINE): {hint}"
            )


def _local_or_hub(name: str) -> bool:
    """An existing path, or a name shaped like a hub id (`owner/model`)."""
    parts = name.split("/")
    return Path(name).exists() or (len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")))


def check_model_paths(paths: dict[str, str | None]) -> None:
    """Each given model (flag -> value) is an existing path or a hub id."""
    for flag, value in paths.items():
        if value and not _local_or_hub(value):
            raise LayoutRetouchError(f"{flag} {value!r} does not exist (not a file, folder or hub id)")


def check_model_options(args) -> None:
    """The model options that loading would refuse only after the base model (minutes for SD) is in memory."""
    check_model_paths({"--base": args.base, "--base-config": args.base_config, "--vae": getattr(args, "vae", None)})
    if args.personalized:
        if not Path(args.personalized).exists():
            raise LayoutRetouchError(f"personalized model {args.personalized!r} does not exist")
        if not args.token:
            raise LayoutRetouchError("a personalized model needs its token (e.g. --token sks)")
    if args.token and not args.class_word:
        raise LayoutRetouchError("a personal token needs the subject's class word (e.g. --class-word dog)")


def check_output_folder(out: str | Path, flag: str = "--out") -> Path:
    """`out` is, or can become, a folder this process can write to; checked before any work, created later."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LayoutRetouchError(f"{flag} {out} is a file, not a folder")
    ancestor = out
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LayoutRetouchError(f"{flag} {out} cannot be made: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LayoutRetouchError(f"{flag} {out} cannot be written: no write permission in {ancestor}")
    return out
