"""The unit of work: one image of one method, concept, prompt and seed, with its file paths."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from layout_retouch.config import resolve_method
from layout_retouch.errors import PromptError
from layout_retouch.evaluation.concepts import Concept
from layout_retouch.evaluation.prompt_sets import fill, load_prompt_set, prompt_set_label, resolve_prompt_set

IMAGES_DIR = "images"
SCORES_DIR = "scores"


@dataclass(frozen=True)
class Job:
    method: str
    concept: Concept
    prompt_set: str
    prompt_index: int
    template: str
    seed: int

    @property
    def prompt(self) -> str:
        """The generation prompt, with the concept's token and class word."""
        return fill(self.template, self.concept.subject_phrase)

    @property
    def relative_stem(self) -> Path:
        name = f"p{self.prompt_index:03d}_seed{self.seed:05d}"
        return Path(self.method) / self.concept.name / self.prompt_set / name

    def image_path(self, out_dir: Path) -> Path:
        return Path(out_dir) / IMAGES_DIR / self.relative_stem.with_suffix(".png")

    def record_path(self, out_dir: Path) -> Path:
        return Path(out_dir) / SCORES_DIR / self.relative_stem.with_suffix(".safetensors")


def seed_batches(jobs: Sequence[Job], size: int) -> list[list[Job]]:
    """Jobs that differ only in their seed, up to `size` at a time (one pipeline call makes them together).

    Groups come in the order of their first job; with `size` 1 the jobs keep their own order.
    """
    if size <= 1:
        return [[job] for job in jobs]
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.method, job.concept, job.prompt_set, job.prompt_index), []).append(job)
    return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]


def build_jobs(
    methods: Sequence[str],
    concepts: Sequence[Concept],
    prompt_sets: Sequence[str],
    seeds: Sequence[int],
    limit: int | None = None,
) -> list[Job]:
    """All combinations, concept-major (one personalized model at a time), methods innermost so
    that `limit` keeps matched images of every method for a quick look."""
    methods = list(dict.fromkeys(resolve_method(m) for m in methods))
    jobs = []
    for concept in concepts:
        seen: dict[str, str] = {}  # folder label -> the set filed under it
        for set_name in prompt_sets:
            resolved = resolve_prompt_set(set_name, concept.live)
            label = prompt_set_label(resolved)
            source = resolved if label == resolved else str(Path(resolved).resolve())
            if label in seen:
                if seen[label] != source:
                    raise PromptError(
                        f"prompt sets {seen[label]} and {source} would share the folder {label!r}: rename one"
                    )
                continue  # the same set named twice
            seen[label] = source
            templates = load_prompt_set(set_name, concept.live)
            for index, template in enumerate(templates):
                for seed in seeds:
                    for method in methods:
                        jobs.append(Job(method, concept, label, index, template, int(seed)))
    return jobs if limit is None else jobs[: max(limit, 0)]
