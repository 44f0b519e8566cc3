"""The built-in prompt sets (ViCo / DreamBooth normal, DreamMatcher challenging) and prompt files.

A template holds `{}` where the subject phrase goes. `normal` and `challenging` pick the live or
object variant per concept; `normal_live` etc. name one list; anything else is a text file path.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from layout_retouch.errors import PromptError

# The prompt lists are package data of `layout_retouch` (data/prompts/*.txt). Read through
# importlib.resources from this regular sub-package's folder: the top package has no __init__.py,
# and namespace packages under an editable install break `resources.files("layout_retouch")`.
PROMPT_FOLDER = ("..", "data", "prompts")
BUILTIN_SETS = ("normal_live", "normal_nonlive", "challenging_live", "challenging_nonlive")
LIVE_DEPENDENT_SETS = ("normal", "challenging")


def _read_templates(text: str, source: str) -> list[str]:
    templates = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not templates:
        raise PromptError(f"prompt set {source} is empty")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise PromptError(
            f"prompt set {source}: each line needs exactly one {{}} for the subject, not {bad[0]!r}"
        )
    return templates


def resolve_prompt_set(name: str, live: bool) -> str:
    """The concrete set for a concept: `normal` -> `normal_live` or `normal_nonlive`."""
    return f"{name}_{'live' if live else 'nonlive'}" if name in LIVE_DEPENDENT_SETS else name


def prompt_set_label(name: str) -> str:
    """Short name used in file paths and tables (a file's stem for prompt files)."""
    return name if name in BUILTIN_SETS or name in LIVE_DEPENDENT_SETS else Path(name).stem


def load_prompt_set(name: str, live: bool = False) -> list[str]:
    name = resolve_prompt_set(name, live)
    if name in BUILTIN_SETS:
        resource = resources.files(__package__).joinpath(*PROMPT_FOLDER, f"{name}.txt")
        text = resource.read_text(encoding="utf-8")
        return _read_templates(text, name)
    path = Path(name)
    if path.suffix and path.is_file():
        return _read_templates(path.read_text(encoding="utf-8"), str(path))
    choices = ", ".join(LIVE_DEPENDENT_SETS + BUILTIN_SETS)
    raise PromptError(
        f"unknown prompt set {name!r}: choose one of {choices}, or give a text file of templates"
    )


def fill(template: str, phrase: str) -> str:
    return template.replace("{}", phrase)
