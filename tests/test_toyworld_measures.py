"""Oracle-read measures: the arithmetic of fidelity, identity and layout diversity."""

import math

import numpy as np
import pytest

from layout_retouch.toyworld.measures import (
    identity,
    layout_diversity,
    position_followed,
    prompt_fidelity,
    size_word,
)
from layout_retouch.toyworld.oracles import Reading


def reading(**kw):
    base = dict(scene="beach", obj="star", color="red", hat=None, fence=False, identity=0.5,
                center=(32.0, 32.0), size=24.0, mask=np.zeros((64, 64), bool))
    base.update(kw)
    return Reading(**base)


def test_prompt_fidelity_counts_only_what_is_asked():
    prompts = ["a photo of a red star wearing a blue hat on the beach",
               "a photo of a small sks star behind a fence at night",
               "a photo of a star on the left"]
    readings = [reading(hat="green"),
                reading(scene="snow", fence=True, size=12.0, color="blue"),
                reading(center=(10.0, 40.0))]
    fid = prompt_fidelity(readings, prompts)
    assert fid["scene"] == {"rate": 0.5, "n": 2}
    assert fid["accessory"]["rate"] == 1.0 and fid["accessory_color"]["rate"] == 0.0
    assert fid["occluder"] == {"rate": 1.0, "n": 1}
    assert fid["size"] == {"rate": 1.0, "n": 1}
    assert fid["color"]["n"] == 1  # the personal subject's color is not asked
    assert fid["class"] == {"rate": 1.0, "n": 3}
    assert fid["position"] == {"rate": 1.0, "n": 1}
    assert fid["context"]["rate"] == 2 / 3


def test_size_and_position_words():
    assert [size_word(d) for d in (12, 24, 34)] == ["small", "medium", "large"]
    assert position_followed("left", (20, 50)) and not position_followed("left", (30, 50))
    assert position_followed("center", (33, 30)) and not position_followed("center", (45, 30))


def test_layout_diversity_spread_and_entropy():
    same = layout_diversity([(32.0, 32.0)] * 16)
    assert same["std"] == 0 and same["grid_entropy_bits"] == 0
    grid = [(8 + 16 * i, 8 + 16 * j) for i in range(4) for j in range(4)]
    spread = layout_diversity(grid)
    assert math.isclose(spread["grid_entropy_bits"], 4.0) and spread["std"] > 20


def test_identity_is_the_mean_probability():
    assert identity([reading(identity=0.2), reading(identity=0.8)]) == 0.5


def test_personalized_report_refuses_a_prompt_template_without_its_fields(capsys):
    """The report's prompt wording can be set (a toy personalization may answer to one wording only); a template
    that cannot name the subject or the context is refused before any model loads."""
    from layout_retouch.toyworld.personalized_report import main

    for argv, named in ((["--neutral", "a photo of a star"], "{subject}"),
                        (["--context", "a photo of a {subject}"], "{context}")):
        with pytest.raises(SystemExit):
            main(argv)
        assert named in capsys.readouterr().err
