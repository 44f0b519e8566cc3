"""Concept folders, prompt sets and the job list."""

import json

import pytest
from metric_tiny_models import make_concept

from layout_retouch.errors import ImageInputError, LayoutRetouchError, PromptError
from layout_retouch.evaluation.concepts import load_concept, load_concepts
from layout_retouch.evaluation.jobs import build_jobs
from layout_retouch.evaluation.prompt_sets import load_prompt_set


def test_concept_metadata_is_read(tmp_path):
    folder = make_concept(tmp_path / "brown_dog", n_images=3)
    meta = json.loads((folder / "concept.json").read_text())
    (folder / "concept.json").write_text(json.dumps({**meta, "weights": "lora.safetensors",
                                                     "weights_kind": "lora"}))
    c = load_concept(folder)
    assert (c.name, c.token, c.class_word, c.live) == ("brown_dog", "sks", "dog", True)
    assert [p.name for p in c.images] == ["00.png", "01.png", "02.png"]
    assert c.reference_image == folder / "00.png"
    assert c.weights == str(folder / "lora.safetensors") and c.personalization == "lora"
    assert c.subject_phrase == "sks dog"


def test_concept_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "concept.json").write_text('{"token": "sks", "class_word": "dog"}')
    with pytest.raises(ImageInputError, match="has no images"):
        load_concept(empty)
    bare = make_concept(tmp_path / "bare")
    (bare / "concept.json").unlink()
    with pytest.raises(LayoutRetouchError, match="no concept.json"):
        load_concept(bare)
    bad = make_concept(tmp_path / "bad")
    (bad / "concept.json").write_text('{"token": "sks"}')
    with pytest.raises(LayoutRetouchError, match="lacks class_word"):
        load_concept(bad)
    with pytest.raises(ImageInputError, match="does not exist"):
        load_concept(tmp_path / "missing")


def test_folder_of_concepts(tmp_path):
    make_concept(tmp_path / "root" / "b")
    make_concept(tmp_path / "root" / "a", live=False)
    assert [c.name for c in load_concepts([tmp_path / "root"])] == ["a", "b"]
    with pytest.raises(LayoutRetouchError, match="unique"):
        load_concepts([tmp_path / "root", tmp_path / "root" / "a"])


def test_builtin_prompt_sets_follow_liveness():
    assert len(load_prompt_set("normal", live=True)) == 31
    assert load_prompt_set("normal", live=True) == load_prompt_set("normal_live")
    assert load_prompt_set("challenging", live=False) == load_prompt_set("challenging_nonlive")
    assert len(load_prompt_set("challenging_live")) == 24
    assert all(t.count("{}") == 1 for t in load_prompt_set("normal_nonlive"))


def test_prompt_set_errors_and_files(tmp_path):
    with pytest.raises(PromptError, match="unknown prompt set 'weird'.*normal"):
        load_prompt_set("weird")
    good = tmp_path / "mine.txt"
    good.write_text("a {} on the moon\n\na {} at night\n")
    assert load_prompt_set(str(good)) == ["a {} on the moon", "a {} at night"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a dog on the moon\n")
    with pytest.raises(PromptError, match="exactly one"):
        load_prompt_set(str(bad))


def test_jobs_cover_every_combination_and_limit_keeps_methods_together(tmp_path):
    concepts = load_concepts([make_concept(tmp_path / "c1"), make_concept(tmp_path / "c2", live=False)])
    jobs = build_jobs(["I", "full"], concepts, ["normal"], [0, 1])
    assert len(jobs) == 2 * 31 * 2 * 2
    assert len({(j.method, j.concept.name, j.prompt_index, j.seed) for j in jobs}) == len(jobs)
    assert {j.prompt_set for j in jobs} == {"normal_live", "normal_nonlive"}
    first = build_jobs(["I", "V"], concepts, ["normal"], [0, 1], limit=4)
    assert [(j.method, j.seed) for j in first] == [("I", 0), ("V", 0), ("I", 1), ("V", 1)]
    assert first[0].prompt == "a sks dog in the jungle"
    with pytest.raises(LayoutRetouchError, match="unknown method"):
        build_jobs(["VI"], concepts, ["normal"], [0])
