"""GPU checks the CPU suite cannot make: every method and personalization kind runs on CUDA, in fp16,
and with model offload, with recorded features kept in host memory, with fused attention projections
and with every optimization off, gives the images it gives by default; an inversion riding in Stage
1's calls gives those of one run alone (run on a machine with a GPU).

    python benchmarks/gpu_checks.py [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch

from layout_retouch.cli.demo import CLASS_WORD, TOY_METHOD, TOY_MODELS
from layout_retouch.config import STRAIGHTFORWARD, LayoutRetouchConfig
from layout_retouch.pipeline import LayoutRetouchPipeline

PERSONALIZED = {"dreambooth": ("sks_star_dreambooth", "sks"), "lora": ("sks_star_lora", "sks"),
                "textual_inversion": ("sks_star_ti", "<sks>")}


# Variants of the full method that must give its default images: features in host memory, and the
# straightforward implementation (every optimization off).
SAME_IMAGES = {"features on host": dict(feature_offload=True),
               "straightforward": STRAIGHTFORWARD}


def run(pipe, token: str, method: str, cache: str, masks: bool = False, **overrides):
    """The latents of one two-seed run (with `masks`: and its final blend masks)."""
    config = LayoutRetouchConfig(method=method, num_inference_steps=10, inversion_cache_dir=cache,
                                 **{**TOY_METHOD, **overrides})
    generator = [torch.Generator().manual_seed(s) for s in range(2)]
    reference = TOY_MODELS / "references" / "sks_star_00.png"
    output = pipe(f"a photo of a {token} star on the beach", reference_image=reference, config=config,
                  num_images_per_prompt=2, generator=generator, output_type="latent")
    latents = output.images.float().cpu()
    return (latents, output.masks.get("final")) if masks else latents


def load(folder: str, token: str, dtype: torch.dtype) -> LayoutRetouchPipeline:
    return LayoutRetouchPipeline.from_pretrained(str(TOY_MODELS / "vanilla"), personalized=str(TOY_MODELS / folder),
                                                 token=token, class_word=CLASS_WORD, torch_dtype=dtype, progress=False)


def check_same_images(pipe, kind: str, folder: str, token: str, dtype: torch.dtype, args) -> int:
    """The full method's variants that must give its default images; returns the number of failures."""
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2

    def check(name: str, measure) -> int:
        """Report one comparison (`measure` gives its message and whether it failed); count a failure."""
        try:
            message, failed = measure()
            print(f"{kind:18s} {str(dtype):14s} V   {name} {message}")
            return int(failed)
        except Exception as err:  # report every failure, not just the first
            print(f"{kind:18s} {str(dtype):14s} V   {name} FAILED: {type(err).__name__}: {err}")
            return 1

    def largest(expected, make):  # both callables: a failure in either is reported
        diff = (make() - expected()).abs().max().item()
        return f"max|diff|={diff:.2e}", diff > tolerance

    def fresh(**overrides) -> torch.Tensor:  # every run records the reference in its first Stage 2
        pipe.clear_feature_cache()
        return run(pipe, token, "V", args.cache, **overrides)

    def offloaded() -> torch.Tensor:
        other = load(folder, token, dtype)
        other.enable_model_cpu_offload(args.device)
        return run(other, token, "V", args.cache)

    def inverted(share: bool):  # a fresh inversion cache: the reference is inverted again
        pipe.clear_feature_cache()
        with tempfile.TemporaryDirectory() as cache:
            return run(pipe, token, "V", cache, masks=True, share_inversion_calls=share)

    def fused():  # its own inversion too (the fused model's fingerprint differs), riding like inverted(True)'s
        other = load(folder, token, dtype).to(args.device)
        other.fuse_qkv_projections()
        with tempfile.TemporaryDirectory() as cache:
            return run(other, token, "V", cache, masks=True)

    def agree(expected, make):
        """Other batch shapes and matmul shapes round differently: in fp16 a mask pixel may flip at its
        threshold (as the CPU tests allow), which moves a few latents by more than rounding, so the mean
        difference and the masks' agreement are compared."""
        (want, want_mask), (got, got_mask) = expected(), make()
        diff, agreement = (got - want).abs(), float((got_mask == want_mask).mean())
        return (f"max|diff|={diff.max():.2e} mean|diff|={diff.mean():.2e} mask agreement={agreement:.4f}",
                diff.mean() > tolerance or agreement < 0.99)

    reference = fresh()
    failures = sum(check(name, lambda o=overrides: largest(lambda: reference, lambda: fresh(**o)))
                   for name, overrides in SAME_IMAGES.items())
    failures += check("offload", lambda: largest(lambda: reference, offloaded))
    failures += check("inversion riding in Stage 1", lambda: agree(lambda: inverted(False), lambda: inverted(True)))
    if kind != "lora":  # a LoRA switches the projections' weights: fusing is refused
        failures += check("fused projections", lambda: agree(lambda: inverted(True), fused))
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cache", default="/tmp/gpu_checks_cache")
    args = parser.parse_args()
    failures = 0
    for kind, (folder, token) in PERSONALIZED.items():
        for dtype in (torch.float32, torch.float16):
            on_device = load(folder, token, dtype).to(args.device)
            for method in ("I", "II", "III", "IV", "V"):
                try:
                    latents = run(on_device, token, method, args.cache)
                    ok = bool(torch.isfinite(latents).all())
                    print(f"{kind:18s} {str(dtype):14s} {method:3s} finite={ok} mean|z|={latents.abs().mean():.3f}")
                    failures += not ok
                except Exception as err:  # report every failure, not just the first
                    print(f"{kind:18s} {str(dtype):14s} {method:3s} FAILED: {type(err).__name__}: {err}")
                    failures += 1
            failures += check_same_images(on_device, kind, folder, token, dtype, args)
    print(f"failures: {failures}")
    return int(failures > 0)


if __name__ == "__main__":
    sys.exit(main())
