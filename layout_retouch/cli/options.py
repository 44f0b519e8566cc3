"""CLI options shared by the commands that load models and generate."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from layout_retouch.config import METHOD_NAMES, LayoutRetouchConfig
from layout_retouch.errors import LayoutRetouchError
from layout_retouch.models import KINDS


def add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (0: torch's default; default: the cores idle when the command "
                   "starts, at least 1: on this project's 2-core machine two threads ran a toy benchmark "
                   "1.9x faster than one when quiet, and 3-15x slower when another job held a core)")


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


def add_model_options(p: argparse.ArgumentParser, base_required: bool = True) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--base", required=base_required,
                   help="base (vanilla) model: hub id, diffusers folder, or single .safetensors file")
    g.add_argument("--base-config", help="config folder or hub id for a single-file base checkpoint")
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
    g.add_argument("--segmenter", help="sam, none, toy or module:attr (sam)")
    g.add_argument("--sam-model", help="SAM hub id or local folder (facebook/sam-vit-base)")
    g.add_argument("--mask-attention-resolution", type=float, help="cross-attention maps' size / latent (0.25)")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--inversion-cache-dir", help="where reference inversions are cached")


METHOD_FIELDS = ("method", "num_inference_steps", "guidance_scale", "vanilla_steps", "ref_start_step",
                 "mask_start_step", "tau", "segmenter", "sam_model", "mask_attention_resolution", "height",
                 "width", "inversion_cache_dir")


def _count_or_fraction(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and ("." not in text) else value


def config_from_args(args) -> LayoutRetouchConfig:
    data = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise LayoutRetouchError(f"config file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise LayoutRetouchError(f"config file {path} is not valid JSON: {err}") from err
    data.update({k: getattr(args, k) for k in METHOD_FIELDS if getattr(args, k, None) is not None})
    return LayoutRetouchConfig.from_dict(data)
