"""Side-by-side cost of plain personalized sampling and the full method, on SD 1.5's or SDXL's real architecture.

Both go through `LayoutRetouchPipeline.__call__`, the code path users run: plain sampling is method I
(Stage 1 with T_l = 0), the full method is config V with `segmenter="none"` (no Segment Anything
weights can be loaded offline; M_sam is then empty and M is built from cross-attention alone). The
models are SD 1.5's UNet, VAE and CLIP text encoder built from `sd15_configs.py` with random weights,
plus a DreamBooth-style second UNet (or `--personalization lora`: one UNet with a LoRA adapter).
`--arch sdxl` builds SDXL 1.0 base's architecture instead (`sdxl_configs.py`: two text encoders, pooled
text and time ids), with a LoRA by default (the common SDXL recipe; a second SDXL UNet holds 10 GB in fp32).

One concept, several prompts x seeds: the full method inverts the reference once per run (a fresh
inversion cache folder and a cleared in-memory feature cache each run, so nothing is carried from run
to run) and that cost is spread over the run's images. Plain and full runs alternate (the order flips
every repeat) so that other load on the machine hits both alike; the spread over repeats is printed.

Peak memory: on CUDA, torch.cuda.max_memory_allocated around each run. On the CPU, each method makes
one image (the first of a concept, which also inverts the reference and fills the caches) in a
subprocess of its own that reads the kernel's resident-set high-water mark (VmHWM), reset after the
models are built; the table shows that peak and, in brackets, its excess over the loaded models.

`--baselines` (or `--baselines freeu magicfusion`) adds the paper's baselines as variants of their own, timed
in the same alternation, each with its ratio to plain sampling (`ratio <name>/plain`).

The last line printed is `ratio <seconds per image of the full method / of plain sampling>`.

    python benchmarks/speed.py --quick           # minutes on a CPU
    python benchmarks/speed.py --quick --baselines   # plus FreeU, MagicFusion and DreamMatcher
    python benchmarks/speed.py                   # CPU, fp32, 256 px, 10 steps, 4 prompts x 1 seed
    python benchmarks/speed.py --device cuda --dtype fp16 --resolution 512 --steps 50
    python benchmarks/speed.py --arch sdxl --dtype bf16 --resolution 128 --steps 2 --prompts 1 --repeats 1 --no-memory
    python benchmarks/speed.py --arch sdxl --device cuda --dtype fp16 --resolution 1024 --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from benchmarks import sd15_configs, sdxl_configs  # noqa: E402
from layout_retouch.config import BASELINES, STRAIGHTFORWARD, LayoutRetouchConfig  # noqa: E402
from layout_retouch.models import ModelPair, load_lora  # noqa: E402
from layout_retouch.pipeline import LayoutRetouchPipeline  # noqa: E402

PROMPTS = ("a sks dog in the snow", "a sks dog on the beach", "a sks dog at night", "a photo of a sks dog in a bucket")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_RANK = 4  # a typical DreamBooth-LoRA rank
SEED = 42  # the paper's seed; the s-th seed of a prompt is SEED + s
ARCHITECTURES = {"sd15": "SD 1.5", "sdxl": "SDXL 1.0 base"}


def build_pipeline(personalization: str, device: str, dtype: torch.dtype, arch: str = "sd15") -> LayoutRetouchPipeline:
    if arch == "sdxl":
        configs_module, pipe = sdxl_configs, sdxl_configs.sdxl_pipeline(seed=0, dtype=dtype)
    else:
        configs_module, pipe = sd15_configs, sd15_configs.sd15_pipeline(seed=0)
    pair = ModelPair(pipe=pipe, token="sks", class_word="dog", kind=personalization)
    if personalization == "dreambooth":
        pair.personal_unet = configs_module.dreambooth_unet(pipe.unet, seed=1)
    else:
        with tempfile.TemporaryDirectory() as folder:
            save_random_lora(pipe, Path(folder))
            load_lora(pair, Path(folder), dtype, allow_pickle=False)  # the loader users go through
    pair.to(device, dtype)
    return LayoutRetouchPipeline(pair, progress=False)


def save_random_lora(pipe, folder: Path) -> None:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = pipe.unet
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="scratch")
    layers = get_peft_model_state_dict(unet, adapter_name="scratch")
    unet.delete_adapters("scratch")
    type(pipe).save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)


def reference_photo(size: int) -> Image.Image:
    """A fixed synthetic 'photo': a colored subject on a textured background."""
    rng = np.random.default_rng(0)
    background = (rng.random((size // 8, size // 8, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(background).resize((size, size), Image.BICUBIC)
    ImageDraw.Draw(image).ellipse((size * 0.3, size * 0.25, size * 0.7, size * 0.8), fill=(200, 120, 40))
    return image


class UNetCounter:
    """Counts UNet calls and the batch rows they evaluate, with a forward pre-hook on every UNet."""

    def __init__(self, unets):
        self.calls = self.rows = 0
        self.handles = [u.register_forward_pre_hook(self._hook) for u in {id(u): u for u in unets}.values()]

    def _hook(self, module, args):
        self.calls += 1
        self.rows += int(args[0].shape[0])

    def reset(self) -> None:
        self.calls = self.rows = 0


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators a run dispatches: each is at least one kernel launch on a GPU.

    Where a GPU is bound by launching work rather than doing it (SD 1.5 at 512 px, batch 2, on an
    H100), time follows this count more closely than UNet rows; it does not depend on the resolution.
    """

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def configs(args) -> dict[str, LayoutRetouchConfig]:
    common = dict(num_inference_steps=args.steps, height=args.resolution, width=args.resolution)
    full = LayoutRetouchConfig(method="V", segmenter="none", **common, **dict(args.set))
    variants = {"plain": LayoutRetouchConfig(method="I", **common), "full": full}
    if args.straightforward:
        variants["straightforward"] = full.replace(**STRAIGHTFORWARD)
    for baseline in args.baselines or ():
        variants[baseline] = LayoutRetouchConfig(method=baseline, **common)
    return variants


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_once(pipe, config: LayoutRetouchConfig, prompts, seeds: int, reference, device: str) -> float:
    """Generate every prompt x seed of one concept from a cold start; return the seconds taken."""
    with tempfile.TemporaryDirectory() as cache:
        config = config.replace(inversion_cache_dir=cache)
        if hasattr(pipe, "clear_feature_cache"):
            pipe.clear_feature_cache()
        synchronize(device)
        start = time.perf_counter()
        for prompt in prompts:
            generators = [torch.Generator(device).manual_seed(SEED + s) for s in range(seeds)]
            pipe(prompt, reference_image=reference if config.uses_reference else None, config=config,
                 num_images_per_prompt=seeds, generator=generators, output_type="pil")
        synchronize(device)
        return time.perf_counter() - start


def time_side_by_side(args) -> dict:
    pipe = build_pipeline(args.personalization, args.device, DTYPES[args.dtype], args.arch)
    apply_model_options(pipe, args)
    counter = UNetCounter(pipe.models.unets())
    reference = reference_photo(args.resolution)
    prompts = PROMPTS[: args.prompts]
    images = len(prompts) * args.seeds
    variants = configs(args)
    seconds = {name: [] for name in variants}
    evaluations, peaks = {}, {}
    if args.warmup:
        run_once(pipe, variants["plain"].replace(num_inference_steps=1), prompts[:1], 1, reference, args.device)
    for repeat in range(args.repeats):
        order = list(variants) if repeat % 2 == 0 else list(variants)[::-1]
        for name in order:
            counter.reset()
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            taken = run_once(pipe, variants[name], prompts, args.seeds, reference, args.device)
            seconds[name].append(taken / images)
            evaluations[name] = (counter.calls / images, counter.rows / images)
            if args.device.startswith("cuda"):
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
            print(f"  repeat {repeat}: {name:15s} {taken / images:8.2f} s/image", flush=True)
    ops = {}
    if args.count_ops:  # a separate run: the counter's own overhead stays out of the timings
        for name, config in variants.items():
            counter.reset()
            with OpCounter() as counter_ops:
                run_once(pipe, config, prompts, args.seeds, reference, args.device)
            ops[name] = counter_ops.ops / images
            evaluations[name] = (counter.calls / images, counter.rows / images)
            print(f"  ops: {name:15s} {ops[name]:10.0f} ATen ops/image", flush=True)
    return {"seconds": seconds, "evaluations": evaluations, "peaks": peaks, "images": images, "ops": ops}


def apply_model_options(pipe, args) -> None:
    if args.fuse_qkv:
        pipe.fuse_qkv_projections()
    if args.channels_last:
        for unet in pipe.models.unets():
            unet.to(memory_format=torch.channels_last)
    if args.compile:
        pipe.compile_unets(args.compile)  # what `--compile` and LayoutRetouchConfig.compile_unet do


def measure_memory_in_subprocess(args, name: str) -> dict:
    """Run one variant alone in a fresh process and return its resident-set figures (CPU)."""
    cmd = [sys.executable, __file__, "--memory-worker", name] + [a for a in sys.argv[1:] if a != "--quick"]
    cmd += ["--resolution", str(args.resolution), "--steps", str(args.steps), "--prompts", str(args.prompts)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker for {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_worker(args) -> None:
    pipe = build_pipeline(args.personalization, args.device, DTYPES[args.dtype], args.arch)
    apply_model_options(pipe, args)
    config = configs(args)[args.memory_worker]
    reference = reference_photo(args.resolution)
    models = resident_kib("VmRSS")
    reset = reset_high_water()
    before = resident_kib("VmHWM") if reset else models
    run_once(pipe, config, PROMPTS[:1], args.seeds, reference, args.device)  # the first image holds the peak
    print(json.dumps({"models_mib": models / 1024, "peak_mib": resident_kib("VmHWM") / 1024,
                      "hwm_reset": reset, "high_water_before_mib": before / 1024}))


def resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_high_water() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def summarize(args, timing: dict, memory: dict) -> None:
    seconds = timing["seconds"]
    print(f"\n{ARCHITECTURES[args.arch]} architecture (random weights), {args.personalization}, "
          f"{args.device} {args.dtype}, {args.resolution} px, {args.steps} DDIM steps, "
          f"{args.prompts} prompts x {args.seeds} seeds, "
          f"{args.repeats} repeats (torch threads: {torch.get_num_threads()})")
    header = f"{'variant':16s} {'s/image (median)':>17s} {'min':>8s} {'max':>8s} {'UNet calls/img':>15s} " \
             f"{'UNet rows/img':>14s} {'peak memory':>24s}"
    if not args.repeats:  # --repeats 0 --count-ops: the counts alone
        print(f"{'variant':16s} {'UNet calls/img':>15s} {'UNet rows/img':>14s} {'ATen ops/img':>13s}")
        for name, count in timing["ops"].items():
            calls, rows = timing["evaluations"][name]
            print(f"{name:16s} {calls:15.1f} {rows:14.1f} {count:13.0f}")
        print_op_ratios(timing["ops"])
        return
    print(header)
    for name, values in seconds.items():
        calls, rows = timing["evaluations"][name]
        if name in timing["peaks"]:
            peak = f"{timing['peaks'][name] / 2**30:.2f} GiB GPU"
        elif name in memory:
            m = memory[name]
            peak = f"{m['peak_mib'] / 1024:.2f} GiB RSS (+{(m['peak_mib'] - m['models_mib']) / 1024:.2f})"
        else:
            peak = "not measured"
        print(f"{name:16s} {statistics.median(values):17.2f} {min(values):8.2f} {max(values):8.2f} "
              f"{calls:15.1f} {rows:14.1f} {peak:>24s}")
    plain = statistics.median(seconds["plain"])
    pairs = [f / p for f, p in zip(seconds["full"], seconds["plain"], strict=True)]
    print(f"per-repeat ratios full/plain: {', '.join(f'{r:.2f}' for r in pairs)}")
    if "straightforward" in seconds:
        print(f"ratio straightforward/plain {statistics.median(seconds['straightforward']) / plain:.3f}")
    for baseline in args.baselines or ():
        print(f"ratio {baseline}/plain {statistics.median(seconds[baseline]) / plain:.3f}")
    if "plain" in memory and "full" in memory:
        extra = {k: memory[k]["peak_mib"] for k in ("plain", "full")}
        print(f"memory ratio full/plain (peak RSS) {extra['full'] / extra['plain']:.3f}")
    if timing["ops"]:
        print_op_ratios(timing["ops"])
    if "plain" in timing["peaks"] and "full" in timing["peaks"]:
        print(f"memory ratio full/plain (peak GPU) {timing['peaks']['full'] / timing['peaks']['plain']:.3f}")
    print(f"ratio {statistics.median(seconds['full']) / plain:.3f}")


def print_op_ratios(ops: dict) -> None:
    print("ATen ops/image: " + ", ".join(f"{k} {v:.0f}" for k, v in ops.items()))
    for name in ops:
        if name != "plain":
            print(f"ops ratio {name}/plain {ops[name] / ops['plain']:.3f}")


def _setting(text: str) -> tuple[str, object]:
    name, _, value = text.partition("=")
    try:
        return name.strip(), json.loads(value)
    except json.JSONDecodeError:
        return name.strip(), value  # a bare string


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="128 px, 6 steps, 2 prompts, 1 repeat: minutes on a CPU")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=4, choices=range(1, len(PROMPTS) + 1))
    parser.add_argument("--seeds", type=int, default=1, help="seeds per prompt, batched in one call")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating plain/full runs; medians reported (0 with --count-ops: counts only)")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="sd15",
                        help="the base architecture: SD 1.5 (default) or SDXL 1.0 base")
    parser.add_argument("--personalization", choices=("dreambooth", "lora"),
                        help="default: dreambooth on sd15, lora on sdxl")
    parser.add_argument("--straightforward", action="store_true",
                        help="also time the full method with every optimization switched off")
    parser.add_argument("--baselines", nargs="*", choices=BASELINES,
                        help="also time these baselines (no names: all of them) against plain sampling")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU memory subprocesses")
    parser.add_argument("--count-ops", action="store_true",
                        help="one more run per variant counting ATen operators (kernel launches on a GPU)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false")
    parser.add_argument("--channels-last", action="store_true", help="UNets in channels-last memory format")
    parser.add_argument("--fuse-qkv", action="store_true",
                        help="fused attention projections (LayoutRetouchPipeline.fuse_qkv_projections), both variants")
    parser.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                        help="torch.compile the UNets (MODE: e.g. max-autotune-no-cudagraphs; default: torch's)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", type=_setting,
                        help="a LayoutRetouchConfig value for the full method (JSON value), e.g. "
                        "--set release_used_features=false; repeatable")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--memory-worker", choices=("plain", "full", "straightforward", *BASELINES),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.personalization is None:
        args.personalization = "lora" if args.arch == "sdxl" else "dreambooth"
    if args.arch == "sdxl" and args.baselines:
        parser.error("the baselines run on SD 1.x/2.x only")
    if args.baselines == []:  # --baselines with no names: all of them
        args.baselines = list(BASELINES)
    if args.repeats < 1 and not args.count_ops:
        parser.error("--repeats 0 measures nothing without --count-ops")
    if args.quick:
        args.resolution, args.steps, args.prompts, args.repeats = 128, 6, 2, 1
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(args)
        return
    memory = {}
    if not args.device.startswith("cuda") and not args.no_memory and args.repeats:
        for name in configs(args):
            memory[name] = measure_memory_in_subprocess(args, name)
            print(f"  memory {name}: {json.dumps(memory[name])}", flush=True)
    timing = time_side_by_side(args)
    summarize(args, timing, memory)


if __name__ == "__main__":
    main()
