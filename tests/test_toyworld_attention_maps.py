"""The self-attention map diagnostic (toyworld/attention_maps.py): its measures on maps whose answer is known."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention

from layout_retouch.toyworld.attention_maps import layer_measures

SIDE, DIM = 4, 8


def attention(identity_qk: bool) -> Attention:
    torch.manual_seed(0)
    attn = Attention(query_dim=DIM, heads=1, dim_head=DIM)
    with torch.no_grad():
        for proj in (attn.to_q, attn.to_k):
            proj.weight.copy_(torch.eye(DIM) if identity_qk else torch.zeros(DIM, DIM))
    return attn


def subject_in_top_left_quarter() -> torch.Tensor:
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[:, :32, :32] = True
    return mask


def two_region_features(scale: float) -> torch.Tensor:
    """Subject tokens (the top-left quarter) one direction, background another: a map that groups them."""
    inside = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    inside[:2, :2] = True
    features = torch.zeros(SIDE * SIDE, DIM)
    features[inside.flatten(), 0] = scale
    features[~inside.flatten(), 1] = scale
    return features[None] + 0.01 * torch.randn(1, SIDE * SIDE, DIM)


def test_same_input_in_both_images_changes_nothing():
    hidden = torch.randn(1, SIDE * SIDE, DIM)
    found = layer_measures(attention(identity_qk=True), hidden, hidden, subject_in_top_left_quarter())
    assert found["map_swap"] == pytest.approx(0, abs=1e-6)
    assert found["output_swap"] == pytest.approx(0, abs=1e-6)
    other = layer_measures(attention(identity_qk=True), torch.randn(1, SIDE * SIDE, DIM), hidden,
                           subject_in_top_left_quarter())
    assert other["map_swap"] > 0.1 and other["output_swap"] > 0.1  # another image: another map, other values


def test_uniform_map_carries_nothing():
    """Zero queries and keys: every query attends everywhere alike; the output is the mean of the values."""
    found = layer_measures(attention(identity_qk=False), torch.randn(1, SIDE * SIDE, DIM),
                           torch.randn(1, SIDE * SIDE, DIM), subject_in_top_left_quarter())
    assert found["entropy"] == pytest.approx(1, abs=1e-5)
    assert found["vs_mean"] == pytest.approx(0, abs=1e-5)
    assert found["map_swap"] == pytest.approx(0, abs=1e-5)
    assert found["grouping"] == pytest.approx(1, abs=1e-5)
    assert found["reach"] == pytest.approx(0.50, abs=0.01)  # mean distance on a 4x4 grid over its side


def test_a_map_that_singles_out_the_subject():
    a = two_region_features(scale=4.0)
    found = layer_measures(attention(identity_qk=True), a, torch.randn(1, SIDE * SIDE, DIM),
                           subject_in_top_left_quarter())
    assert found["grouping"] > 3.5  # the subject is a quarter of the tokens: at most 4


def test_settling_reads_every_step_of_the_toy_world():
    """On the shipped toy world: one distance per step; the last step's prediction of the clean image has the
    final image's subject where the final image has it, the first step's not yet."""
    from layout_retouch.toyworld.attention_maps import settling
    from layout_retouch.toyworld.world import TOY_MODELS, VANILLA

    torch.set_num_threads(1)
    distances = settling(TOY_MODELS / VANILLA, seeds=4, steps=3, guidance=5.0)
    assert len(distances) == 3
    assert distances[-1] < 1.0
    assert distances[0] > distances[-1]
