"""Step progress of the pipeline's loops: a terminal bar, nothing, or a caller's callback.

`LayoutRetouchPipeline.progress` is passed to every loop (Stage 1, the reference's inversion, Stage 2).
True draws tqdm bars, False draws nothing, and a callable `progress(stage, done, total)` is called
before the first step and after each one, so a front end (the web app) can draw its own bar; an
exception it raises ends the run between two steps, which is how the web app's Stop button works.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sized
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
ProgressCallback = Callable[[str, int, int], None]
Progress = bool | ProgressCallback


def track(steps: Iterable[T], desc: str, progress: Progress) -> Iterable[T]:
    """`steps` with their progress shown as `progress` asks (see the module docstring)."""
    if callable(progress):
        return _report(steps, desc, progress)
    return tqdm(steps, desc=desc, disable=not progress, leave=False)


def _report(steps: Iterable[T], desc: str, callback: ProgressCallback) -> Iterator[T]:
    total = len(steps) if isinstance(steps, Sized) else -1
    callback(desc, 0, total)
    for done, step in enumerate(steps, start=1):
        yield step
        callback(desc, done, total)


class StepReport:
    """`track` for a loop that is not a `for` over its steps: Stage 2, whose first steps may ride in Stage 1's
    calls (stage2_retouch.Retouch). `advance()` after each step; the report starts with the first."""

    def __init__(self, desc: str, total: int, progress: Progress):
        self.desc, self.total, self.progress = desc, total, progress
        self.done, self.bar = -1, None

    def start(self) -> None:
        if self.done >= 0:
            return
        self.done = 0
        if callable(self.progress):
            self.progress(self.desc, 0, self.total)
        else:
            self.bar = tqdm(total=self.total, desc=self.desc, disable=not self.progress, leave=False)

    def advance(self) -> None:
        self.start()
        self.done += 1
        if callable(self.progress):
            self.progress(self.desc, self.done, self.total)
        else:
            self.bar.update(1)
            if self.done >= self.total:
                self.bar.close()
