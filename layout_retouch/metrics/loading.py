"""One place that loads metric models, so that missing weights give one clear error."""

from __future__ import annotations

import os
from typing import Any

from layout_retouch.errors import ModelLoadError


def resolve_device(device: str | None) -> str:
    """`None`/`"auto"`: the process's accelerate device (a GPU where one is assigned), else as given."""
    if device in (None, "auto"):
        from accelerate import PartialState

        return str(PartialState().device)
    return device


def load_pretrained(loader: Any, model_id: str, what: str, flag: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(model_id)`, turning "weights not found" into a `ModelLoadError`.

    `what` names the metric model for the message and `flag` the CLI option that overrides it.
    """
    try:
        return loader.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError) as err:
        if os.path.isdir(model_id):
            reason = f"the folder exists but could not be read as one: {str(err).splitlines()[0][:300]}"
        elif os.path.exists(model_id):
            reason = "it is a file; a folder saved with save_pretrained is needed"
        else:
            reason = "no such local folder, and the weights are not in the Hugging Face cache"
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
                reason += " (HF_HUB_OFFLINE is set, so the hub is not asked)"
        raise ModelLoadError(
            f"cannot load the {what} {model_id!r}: {reason}. Download it where the hub is reachable, "
            f"or pass a local folder holding it (config, weights and processor files) with {flag}."
        ) from None
