"""Fine-tune any diffusers Stable Diffusion pipeline on subject photos: DreamBooth, LoRA, Textual Inversion.

    from layout_retouch.personalize import PersonalizeConfig, personalize
    personalize(PersonalizeConfig(method="lora", base="path/to/sd", photos="photos/", output="out/"))
"""

from layout_retouch.personalize.config import METHODS, PersonalizeConfig

__all__ = [
    "EMBEDS_FILE", "LORA_WEIGHTS_FILE", "METADATA_FILE", "METHODS", "PersonalizeConfig", "PersonalizeResult",
    "personalize",
]
# Imported on first use: they pull in torch and diffusers (seconds), which `personalize --help` and the
# light `config` sub-module should not wait for.
_HOMES = {"PersonalizeResult": "api", "personalize": "api", "METADATA_FILE": "common", "LORA_WEIGHTS_FILE": "lora",
          "EMBEDS_FILE": "textual_inversion"}


def __getattr__(name: str):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
