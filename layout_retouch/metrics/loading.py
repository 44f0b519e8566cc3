"""One place that loads metric models, so that missing weights give one clear error."""

from __future__ import annotations

import os
from typing import Any

from layout_retouch.errors import ModelLoadError


def process_state():
    """accelerate's per-process state. Without a GPU it must be told `cpu=True`, or processes
    started by torchrun / `accelerate launch` would each believe they are alone."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def resolve_device(device: str | None) -> str:
    """`None`/`"auto"`: the process's accelerate device (a GPU where one is assigned), else as given."""
    if device in (None, "auto"):
        return str(process_state().device)
    return device


def load_pretrained(loader: Any, model_id: str, what: str, flag: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(model_id)`, turning "weights not found" into a `ModelLoadError`.

    `what` names the metric model for the message and `flag` the CLI option that overrides it.
    """
    try:
        return loader.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError) as err:
        raise _load_error(model_id, what, flag, err) from None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _load_error(model_id: str, what: str, flag: str, err: Exception | None) -> ModelLoadError:
    if os.path.isdir(model_id):
        detail = str(err).splitlines()[0][:300] if err else "no config.json"
        reason = f"the folder exists but could not be read as one: {detail}"
    elif os.path.exists(model_id):
        reason = "it is a file; a folder saved with save_pretrained is needed"
    else:
        reason = "no such local folder, and the weights are not in the Hugging Face cache"
        if _hub_offline():
            reason += " (HF_HUB_OFFLINE is set, so the hub is not asked)"
    return ModelLoadError(
        f"cannot load the {what} {model_id!r}: {reason}. Download it where the hub is reachable, "
        f"or pass a local folder holding it (config, weights and processor files) with {flag}."
    )


def check_available(model_id: str, what: str, flag: str) -> None:
    """Fail early, without loading, when a model can be neither read locally nor downloaded:
    a run should not generate for hours and then find its metric weights missing."""
    if os.path.isdir(model_id):
        if not os.path.isfile(os.path.join(model_id, "config.json")) and not os.path.isfile(
            os.path.join(model_id, "preprocessor_config.json")
        ):
            raise _load_error(model_id, what, flag, None)
        return
    if os.path.exists(model_id):
        raise _load_error(model_id, what, flag, None)
    if os.path.isabs(model_id) or model_id.startswith(".") or model_id.count("/") > 1:
        raise _load_error(model_id, what, flag, None)  # a path that does not exist, not a hub id
    if _hub_offline() and not _in_hub_cache(model_id):
        raise _load_error(model_id, what, flag, None)


def _in_hub_cache(model_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for name in ("config.json", "preprocessor_config.json"):
        try:
            if isinstance(try_to_load_from_cache(model_id, name), str):
                return True
        except ValueError:  # not a valid repo id
            return False
    return False
