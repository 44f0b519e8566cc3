"""Metric preprocessing protocols: our clean default, and DreamMatcher's code base for comparisons.

DreamMatcher's evaluation (which the paper's numbers follow) differs from the textbook metrics in
three ways; `dreammatcher` reproduces them so that our numbers can sit beside published ones:
images are resized to 256 px (bicubic) before the metric processors, DINO gets un-normalized
[0, 1] pixels, and CLIP-T compares with the prompt template text, literal `{}` included.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from layout_retouch.errors import LayoutRetouchError


@dataclass(frozen=True)
class MetricProtocol:
    name: str
    # Square size every image is resized to before any metric processor (None: untouched).
    input_size: int | None
    # PIL resampling filter for that resize.
    resample: int
    # Whether DINO's input is normalized with the processor's mean/std (ImageNet's for dino-vits16).
    dino_normalize: bool
    # CLIP-T text: True compares with the template as written ("a {} in the snow"), False with
    # the prompt whose subject phrase is replaced by the class word ("a dog in the snow").
    literal_template_text: bool

    def prepare(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB")
        if self.input_size is not None:
            image = image.resize((self.input_size, self.input_size), self.resample)
        return image

    def clip_t_text(self, template: str, class_word: str) -> str:
        return template if self.literal_template_text else template.replace("{}", class_word)


# DreamMatcher's evaluation resizes every image to this size, bicubic, before the metric models.
DREAMMATCHER_INPUT_SIZE = 256

PROTOCOLS: dict[str, MetricProtocol] = {
    "clean": MetricProtocol("clean", None, Image.Resampling.BICUBIC, True, False),
    "dreammatcher": MetricProtocol(
        "dreammatcher", DREAMMATCHER_INPUT_SIZE, Image.Resampling.BICUBIC, False, True
    ),
}


def get_protocol(name: str | MetricProtocol) -> MetricProtocol:
    if isinstance(name, MetricProtocol):
        return name
    if name not in PROTOCOLS:
        raise LayoutRetouchError(f"unknown metric protocol {name!r}; choose one of: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
