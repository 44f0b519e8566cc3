"""A baseline's hyperparameters: its dataclass defaults, then the run's `LayoutRetouchConfig.baselines[name]`."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

from layout_retouch.config import LayoutRetouchConfig
from layout_retouch.errors import LayoutRetouchError

T = TypeVar("T")


def baseline_config(cls: type[T], name: str, config: LayoutRetouchConfig) -> T:
    """`cls()` with the overrides the run gives for baseline `name`; unknown names are an error, not ignored."""
    overrides = dict(config.baselines.get(name) or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise LayoutRetouchError(
            f"unknown {name} hyperparameters: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**overrides)
