"""Image generators for the runner: any callable `GenerationRequest -> PIL image` plugs in.

`PipelineGenerator` is the real one (LayoutRetouchPipeline, one personalized model per concept);
tests and other methods (baselines) pass their own callables.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from layout_retouch.config import LayoutRetouchConfig
from layout_retouch.errors import LayoutRetouchError
from layout_retouch.evaluation.concepts import Concept


@dataclass(frozen=True)
class GenerationRequest:
    concept: Concept
    method: str
    prompt: str  # with the subject phrase, e.g. "a sks dog in the snow"
    seed: int
    config: LayoutRetouchConfig


ImageGenerator = Callable[[GenerationRequest], Image.Image]


class PipelineGenerator:
    """Layout-and-Retouch on a base model plus each concept's personalized weights.

    Keeps one pipeline loaded at a time (the runner visits concepts in order); `release()` frees it
    before scoring so that the metric models get the memory.
    """

    def __init__(self, base: str, device: str = "cpu", torch_dtype: torch.dtype = torch.float32) -> None:
        self.base = base
        self.device = device
        self.torch_dtype = torch_dtype
        self._concept: Concept | None = None
        self._pipe = None

    def _pipeline_for(self, concept: Concept):
        if self._concept != concept:
            from layout_retouch.pipeline import LayoutRetouchPipeline

            self.release()
            self._pipe = LayoutRetouchPipeline.from_pretrained(
                self.base,
                personalized=concept.weights,
                personalization=concept.weights_kind,
                token=concept.token,
                class_word=concept.class_word,
                torch_dtype=self.torch_dtype,
                device=self.device,
            )
            self._concept = concept
        return self._pipe

    def __call__(self, request: GenerationRequest) -> Image.Image:
        return self.generate_batch([request])[0]

    def generate_batch(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        """Several seeds of one concept, method and prompt in one pipeline call (each seed its own generator)."""
        first = requests[0]
        if any((r.concept, r.method, r.prompt, r.config) != (first.concept, first.method, first.prompt, first.config)
               for r in requests):
            raise LayoutRetouchError("a batch holds seeds of one concept, method, prompt and config only")
        pipe = self._pipeline_for(first.concept)
        reference = str(first.concept.reference_image) if first.config.uses_reference else None
        out = pipe(
            first.prompt,
            reference_image=reference,
            config=first.config,
            num_images_per_prompt=len(requests),
            generator=[torch.Generator().manual_seed(r.seed) for r in requests],
            output_type="pil",
        )
        return out.images

    def release(self) -> None:
        self._pipe = None
        self._concept = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def import_generator(spec: str) -> ImageGenerator:
    """`package.module:name` -> that callable (for --generator)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise LayoutRetouchError(f"--generator needs the form package.module:callable, got {spec!r}")
    try:
        generator = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise LayoutRetouchError(f"cannot import generator {spec!r}: {err}") from None
    if not callable(generator):
        raise LayoutRetouchError(f"generator {spec!r} is not callable")
    return generator
