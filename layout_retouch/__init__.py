"""Layout-and-Retouch: varied layouts for personalized Stable Diffusion, training-free.

Stage 1 (stage1_layout) lets the vanilla model set the layout; Stage 2 (stage2_retouch) retouches
the subject with the reference's appearance through attention control (attention_control) and an
adaptive mask (masks, segmenters). `LayoutRetouchPipeline` runs both; `LayoutRetouchConfig` holds
every hyperparameter.
"""

import logging


class _NoTorchvisionNotice(logging.Filter):
    """transformers 5 says at every image processor that torchvision is missing and it falls back to PIL;
    this project uses the PIL processors on purpose, so the notice is noise (its other warnings stay)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())

__all__ = ["LayoutRetouchConfig", "LayoutRetouchOutput", "LayoutRetouchPipeline"]
__version__ = "0.1.0"
_HOMES = {"LayoutRetouchConfig": "config", "LayoutRetouchOutput": "pipeline", "LayoutRetouchPipeline": "pipeline"}


def __getattr__(name: str):
    """Import on first use: the pipeline pulls in torch and diffusers (seconds), which the command line's
    `--help` and its input checks, and light sub-modules such as `layout_retouch.config`, should not wait for."""
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
