"""How much each transformer block of a UNet adds to the feature map it sits on.

Stage 2 steers the target through self-attention; a block whose output barely changes its input
feature map cannot carry the layout's structure or background, whatever is swapped or blended in it.

    python -m layout_retouch.toyworld.attention_contribution [--model FOLDER] [--prompt TEXT]
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from layout_retouch.toyworld.personalized_report import MODELS


@contextmanager
def transformer_block_hooks(unet, record: Callable[[str, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Calls `record(name, block input, block output)` at every call of each Transformer2DModel of `unet`."""
    def hook_for(name):
        def hook(module, args, kwargs, output):
            feature = args[0] if args else kwargs["hidden_states"]
            record(name, feature, output[0] if isinstance(output, tuple) else output.sample)
        return hook

    handles = [module.register_forward_hook(hook_for(name), with_kwargs=True)
               for name, module in unet.named_modules() if re.fullmatch(r".*attentions\.\d+", name)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def transformer_contributions(pipe, prompt: str, steps: int = 20, guidance: float = 5.0, seeds: int = 2) -> dict:
    """Mean over calls of |block output - block input| / |block input| for every Transformer2DModel."""
    ratios: dict[str, list[float]] = {}

    def record(name, feature, out):
        ratios.setdefault(name, []).append(((out - feature).float().norm() / feature.float().norm()).item())

    with transformer_block_hooks(pipe.unet, record):
        generator = [torch.Generator().manual_seed(s) for s in range(seeds)]
        pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
             num_images_per_prompt=seeds)
    return {name: sum(values) / len(values) for name, values in ratios.items()}


def main(argv=None) -> int:
    from diffusers import StableDiffusionPipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODELS / "vanilla")
    parser.add_argument("--prompt", default="a photo of a red ball on the beach")
    args = parser.parse_args(argv)
    pipe = StableDiffusionPipeline.from_pretrained(str(args.model), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    for name, ratio in transformer_contributions(pipe, args.prompt).items():
        print(f"{name:40s} {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
