"""The toy world's attention probes: their machinery, their statistics and the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from layout_retouch.attention_control import LAYOUT, TARGET, ControlPlan
from layout_retouch.cli import main
from layout_retouch.sampling import PathInput
from layout_retouch.toyworld.probes import (
    VARIED_LAYOUT,
    ProbeSettings,
    World,
    _retouch,
    _stage1,
    early_map_plan,
    groups,
    interval,
    markdown_table,
    passes,
    probe_config,
    run_probes,
    settled_layout_paths,
    source_outputs_in_target,
    vanilla_outputs_in_personalized,
)

torch.set_num_threads(1)
STEPS = 4


@pytest.fixture(scope="module")
def world():
    return World(ProbeSettings().models)


def test_interval_brackets_the_statistic():
    values = np.arange(16, dtype=float)
    result = interval(values)
    assert result["value"] == pytest.approx(7.5) and result["n"] == 16
    assert result["ci_low"] <= 7.5 <= result["ci_high"] and result["ci_low"] < result["ci_high"]
    assert interval([3.0] * 16, np.mean) == {"value": 3.0, "ci_low": 3.0, "ci_high": 3.0, "n": 16}


def test_groups_deal_every_seed_once():
    dealt = groups(list(range(10)), 4)
    assert [v for v, _ in dealt] == [0, 1, 2, 3]
    assert sorted(s for _, batch in dealt for s in batch) == list(range(10))


def p1_pair(world):
    """P1's first pair: timesteps, A's and B's conditioning, A's noise and B's other noise."""
    a = world.conditioning("a photo of a red star on the beach", False)
    b = world.conditioning("a photo of a red star in the snow", False)
    return world.timesteps(STEPS), a, b, world.noise(0), world.noise(500)


def test_lockstep_without_control_is_plain_sampling(world):
    """A probe's baseline must be what the model draws alone: the source beside it changes nothing."""
    timesteps, a, b, za, zb = p1_pair(world)
    _, together = world.lockstep(PathInput(LAYOUT, za, False, a), PathInput(TARGET, zb, False, b), ControlPlan(),
                                 timesteps, 5.0)
    alone, _ = world.lockstep(PathInput(LAYOUT, zb, False, b), PathInput(TARGET, za, False, a), ControlPlan(),
                              timesteps, 5.0)
    assert torch.allclose(together, alone, atol=1e-5)


def test_injection_changes_the_target_and_is_void_for_its_own_source(world):
    timesteps, a, b, za, zb = p1_pair(world)
    plain = world.lockstep(PathInput(LAYOUT, za, False, a), PathInput(TARGET, zb, False, b), ControlPlan(),
                           timesteps, 5.0)[1]
    injected = world.lockstep(PathInput(LAYOUT, za, False, a), PathInput(TARGET, zb, False, b),
                              early_map_plan(STEPS), timesteps, 5.0)[1]
    assert not torch.allclose(plain, injected, atol=1e-3)
    own = world.lockstep(PathInput(LAYOUT, zb, False, b), PathInput(TARGET, zb, False, b), early_map_plan(STEPS),
                         timesteps, 5.0)[1]
    assert torch.allclose(own, plain, atol=1e-5)  # its own Q, K: the same attention


def test_a_replayed_source_stays_as_given_and_steers_the_target(world):
    """P1's "settled" run: the source's finished image lends its Q, K on every step without being denoised."""
    timesteps, a, b, za, zb = p1_pair(world)
    plain = world.lockstep(PathInput(LAYOUT, za, False, a), PathInput(TARGET, zb, False, b), ControlPlan(),
                           timesteps, 5.0)[1]
    finished = PathInput(LAYOUT, za, False, a, timestep=torch.tensor(0))
    kept, steered = world.lockstep(finished, PathInput(TARGET, zb, False, b), early_map_plan(STEPS), timesteps, 5.0)
    assert torch.equal(kept, za)
    assert not torch.allclose(steered, plain, atol=1e-3)
    alone = world.lockstep(finished, PathInput(TARGET, zb, False, b), ControlPlan(), timesteps, 5.0)[1]
    assert torch.allclose(alone, plain, atol=1e-5)


def test_p1b_settled_target_is_the_methods_target_but_for_the_swap(world):
    """P1b's "settled" reading runs outside `retouch`: without control its target must be the method's own."""
    settings = ProbeSettings(steps=STEPS)
    config = probe_config(settings, VARIED_LAYOUT)
    cond, timesteps, z, layout = _stage1(world, settings, [0], "night", config)
    method = _retouch(world, config, ControlPlan(), cond, z, timesteps, layout)
    finished, target = settled_layout_paths(layout, cond, z)
    kept, alone = world.lockstep(finished, target, ControlPlan(), timesteps, settings.guidance)
    assert torch.equal(kept, layout.latents[-1])
    assert torch.allclose(alone, method, atol=1e-5)
    steered = world.lockstep(finished, target, early_map_plan(STEPS), timesteps, settings.guidance)[1]
    assert not torch.allclose(steered, method, atol=1e-3)


def test_p1_bar_is_relative_to_its_baseline():
    flat = {"P1.median_center_distance_px": 6.0, "P1.baseline_median_center_distance_px": 21.0}
    assert passes("P1.median_center_distance_px", flat)
    assert not passes("P1.median_center_distance_px", {**flat, "P1.median_center_distance_px": 8.0})
    assert passes("P4.min_block_contribution", {"P4.min_block_contribution": 0.03}) is False
    assert passes("P5.final_iou", {"P5.final_iou": 0.5}) is None  # measured, no bar


def test_probes_report_every_headline_number(world, tmp_path):
    settings = ProbeSettings(seeds=2, steps=3)
    run = run_probes(settings, log=lambda text: None)
    table = markdown_table({"shipped": run.results})
    for key in ("P1.median_center_distance_px", "P1.baseline_median_center_distance_px", "P1.scene_rate",
                "P1.settled_source_median_center_distance_px", "P1b.median_center_distance_px",
                "P1b.output_swap_median_center_distance_px", "P1b.settled_layout_median_center_distance_px",
                "P2.paper_layers_scene_agreement", "P2.all_layers_scene_agreement", "P3.color_transfer_rate",
                "P4.min_block_contribution", "P5.final_iou", "P6.baseline_median_center_distance_px",
                "P6.self_attention_16_median_center_distance_px", "P6.stream_4_median_center_distance_px",
                "P6b.baseline_median_center_distance_px", "P6b.stream_8_median_center_distance_px"):
        assert f"| {key} |" in table
    p4 = run.results["P4"]
    assert p4["min_block_contribution"]["value"] == pytest.approx(min(p4["blocks"].values()), abs=1e-3)
    assert len(run.results["P5"]["final"]["iou_per_step"]) >= 1


@pytest.mark.parametrize("argv, message", [
    (["--probes", "P9"], "unknown probe"),
    (["--seeds", "0"], "--seeds must be 1 or more"),
    (["--models", "{tmp}/nowhere"], "no vanilla/model_index.json"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["toy-probes", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists()


def test_command_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "probes"
    assert main(["toy-probes", "--out", str(out), "--probes", "P1,P4", "--seeds", "2", "--steps", "2",
                 "--threads", "1", "--quiet"]) == 0
    report = json.loads((out / "probes.json").read_text())
    assert isinstance(report["P1.median_center_distance_px"], float) and "P1b" not in report
    assert "| P4.min_block_contribution |" in (out / "probes.md").read_text()
    assert main(["toy-probes", "--out", str(out), "--probes", "P4"]) == 2  # never overwritten silently


def test_routing_swap_gives_the_target_the_sources_outputs_at_one_resolution(world):
    """P6's swap: while active, the chosen kind of module at the chosen side returns the source's rows for the
    target's; other sides and inactive steps are left alone."""
    unet = world.pair.pipe.unet
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            seen[name] = output
        return hook

    names = {name: m for name, m in unet.named_modules() if name.endswith("transformer_blocks.0.attn1")}
    z = torch.cat([world.noise(0), world.noise(500)])
    text = world.conditioning("a photo of a red star on the beach", False).cond.expand(2, -1, -1)
    for active in (True, False):
        with source_outputs_in_target(unet, r".*attn1", 16, lambda active=active: active):
            handles = [m.register_forward_hook(keep(name)) for name, m in names.items()]
            try:
                unet(z, 500, encoder_hidden_states=text)
            finally:
                for handle in handles:
                    handle.remove()
        for name, out in seen.items():
            side16 = out.shape[1] == 256
            assert torch.equal(out[0], out[1]) == (active and side16), name


@pytest.mark.parametrize("side", [16, None])
def test_vanilla_outputs_replace_the_personalized_ones_at_the_side_asked(world, side):
    """P6b's swap: the personalized UNet's modules of the route at that side (every side: None) return what the
    vanilla UNet's module of the same name returned in its call just before; other sides and inactive calls are
    its own."""
    vanilla, personalized = world.pair.select(False)[0], world.pair.select(True)[0]
    z = torch.cat([world.noise(0), world.noise(500)])
    text = world.conditioning("a photo of a red star on the beach", False).cond.expand(2, -1, -1)
    for active in (True, False):
        outputs: dict[str, dict[str, torch.Tensor]] = {"vanilla": {}, "personalized": {}}
        with vanilla_outputs_in_personalized(vanilla, personalized, r".*attn1", side, lambda a=active: a):
            handles = [m.register_forward_hook(  # after the swap's hooks: they see what the module returns
                lambda module, args, out, key=key, name=name, seen=outputs: seen[key].__setitem__(name, out))
                for key, unet in (("vanilla", vanilla), ("personalized", personalized))
                for name, m in unet.named_modules() if name.endswith("attn1")]
            try:
                vanilla(z, 500, encoder_hidden_states=text)
                personalized(z, 500, encoder_hidden_states=text)
            finally:
                for handle in handles:
                    handle.remove()
        assert outputs["personalized"]
        for name, out in outputs["personalized"].items():
            swapped = side is None or out.shape[1] == side * side
            assert torch.equal(out, outputs["vanilla"][name]) == (active and swapped), name


def test_a_lent_output_can_be_adapted_to_the_receiver(world):
    """The swap's `adapt` hook: what the personalized module returns is `adapt(name, vanilla's, its own)`."""
    vanilla, personalized = world.pair.select(False)[0], world.pair.select(True)[0]
    z = world.noise(0)
    text = world.conditioning("a photo of a star", False).cond
    own = personalized(z, 500, encoder_hidden_states=text).sample
    seen = []

    def adapt(name, lent, mine):
        seen.append(name)
        return mine
    with vanilla_outputs_in_personalized(vanilla, personalized, r".*attn2\.to_k", None, lambda: True, adapt):
        vanilla(z, 500, encoder_hidden_states=text)
        kept_own = personalized(z, 500, encoder_hidden_states=text).sample
    assert seen and all(name.endswith("attn2.to_k") for name in seen)
    assert torch.equal(kept_own, own)


def test_cross_attention_map_swap_aligns_the_targets_words_with_the_layouts(world):
    """toyworld_swap_windows' map swap: each target token takes the key of the layout's same word, the personal
    token the class word's, and the layout's keys are re-ordered to the target's tokens."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "toyworld_swap_windows.py"
    spec = importlib.util.spec_from_file_location("swap_windows", path)
    windows = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(windows)
    tokenizer = world.pair.tokenizer
    layout, target = "a photo of a star in the snow", "a photo of a sks star"
    alignment = windows.token_alignment(tokenizer, layout, target, "sks", "star")
    ids_layout = tokenizer(layout).input_ids  # BOS a photo of a star in the snow EOS
    assert alignment[:7] == [0, 1, 2, 3, 4, 5, 5]  # ... a -> a, sks -> star, star -> star
    assert alignment[7] == len(ids_layout) - 1  # the end token to the end token
    lent = torch.arange(2 * len(alignment), dtype=torch.float32).view(2, len(alignment), 1)  # (halves, tokens, 1)
    own = -torch.ones_like(lent)
    keys = windows.aligned_keys(alignment)("down.attn2.to_k", lent, own)
    assert torch.equal(keys[0], lent[0])  # the unconditional half: the layout's as it is
    for i, j in enumerate(alignment):
        assert keys[1, i, 0] == (lent[1, j, 0] if j >= 0 else -1)
    assert windows.aligned_keys(alignment)("down.attn2.to_q", lent, own) is lent


def test_a_lora_can_be_the_probed_personalization():
    """P1b runs the method on whichever personalization is named; P6b, which swaps modules between two UNets,
    says why it cannot run on an adapter that shares the vanilla UNet."""
    run = run_probes(ProbeSettings(seeds=1, steps=2, probes=("P1b", "P6b"), personalized="sks_star_lora"),
                     log=lambda text: None)
    assert run.results["P1b"]["median_center_distance_px"]["value"] >= 0
    assert "a DreamBooth" in run.results["P6b"]["skipped"]
