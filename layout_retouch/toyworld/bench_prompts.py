"""The toy benchmark's prompt sets, in the world's caption language, with the subject phrase as `{}`.

"Normal" prompts name only a scene (the paper's ViCo-style prompts); "challenging" ones add what
personalized models tend to lose (DreamMatcher's large-displacement and occlusion categories): a
size word, an accessory, an occluder, a position phrase. A prompt file holds one template per line;
its set is read from what the template asks for, with the oracles' own caption parser.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from layout_retouch.errors import PromptError
from layout_retouch.toyworld.scene import PERSONAL_CLASS, PERSONAL_TOKEN, parse_caption

SUBJECT = "{}"
# What `{}` becomes when a prompt is scored: the oracles' parser reads the personal subject from it,
# whatever token a personalization uses in the prompt it generates from.
SCORING_SUBJECT = f"{PERSONAL_TOKEN} {PERSONAL_CLASS}"

# Two of each kind: the default run must fit 20 minutes on a 2-core CPU with 16 seeds, 3
# personalizations and 5 rows (see bench.py); the two challenging prompts cover all four requests.
# Hats avoid the subject's own tones (purple, yellow), which would blend into it.
NORMAL = (
    "a photo of a {} on the beach",
    "a photo of a {} at night",
)
CHALLENGING = (
    "a photo of a small {} wearing a red hat on the grass",
    "a photo of a {} behind a fence on the left in the snow",
)
# --quick: one of each kind.
QUICK = (NORMAL[0], CHALLENGING[0])


@dataclass(frozen=True)
class BenchPrompt:
    template: str  # caption with `{}` for the subject phrase

    @property
    def kind(self) -> str:
        """`normal` if the prompt asks for a scene at most, else `challenging`."""
        asked = parse_caption(self.scoring_text)
        return "challenging" if (asked.size or asked.hat or asked.fence or asked.position) else "normal"

    @property
    def fixes_position(self) -> bool:
        """A position phrase pins the subject, so its center spread is not layout diversity."""
        return parse_caption(self.scoring_text).position is not None

    @property
    def scoring_text(self) -> str:
        return self.template.format(SCORING_SUBJECT)

    def text(self, subject: str) -> str:
        return self.template.format(subject)


def check_template(template: str, where: str = "prompt") -> str:
    template = template.strip()
    if template.count(SUBJECT) != 1:
        raise PromptError(f"{where} {template!r} must hold the subject phrase as exactly one {{}}, "
                          "e.g. 'a photo of a {} on the beach'")
    asked = parse_caption(template.format(SCORING_SUBJECT))
    if not any((asked.scene, asked.size, asked.hat, asked.fence, asked.position)):
        raise PromptError(f"{where} {template!r} asks for nothing the oracles can check (no scene, size, "
                          "accessory, occluder or position phrase of the toy world)")
    return template


def default_prompts(quick: bool = False) -> list[BenchPrompt]:
    return [BenchPrompt(t) for t in (QUICK if quick else NORMAL + CHALLENGING)]


def load_prompt_file(path: str | Path) -> list[BenchPrompt]:
    """One template per line; blank lines and lines starting with `#` are skipped."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt file {path} does not exist")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            prompts.append(BenchPrompt(check_template(line, f"{path}:{number}")))
    if not prompts:
        raise PromptError(f"prompt file {path} holds no prompts")
    if len({p.template for p in prompts}) != len(prompts):
        raise PromptError(f"prompt file {path} repeats a prompt")
    return prompts
