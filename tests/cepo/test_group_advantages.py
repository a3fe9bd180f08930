"""GRPO group advantages against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from cepo.group_advantages import group_advantages, mixed_groups


def test_against_hand_computation():
    rewards = torch.tensor([1.0, 0.1, 0.0, 0.1, 0.0, 0.0, 0.0, 1.0])  # 2 groups of 4
    a = group_advantages(rewards, 4)
    # group 1: mean 0.3; deviations 0.7, -0.2, -0.3, -0.2; unbiased var = 0.66 / 3 = 0.22
    std = math.sqrt(0.22)
    expected_1 = [d / (std + 1e-6) for d in (0.7, -0.2, -0.3, -0.2)]
    # group 2: mean 0.25; deviations -0.25 x3, 0.75; unbiased var = 0.75 / 3 = 0.25
    expected_2 = [d / (0.5 + 1e-6) for d in (-0.25, -0.25, -0.25, 0.75)]
    torch.testing.assert_close(a, torch.tensor(expected_1 + expected_2))
    # and the same as torch.std (unbiased) row by row
    g = rewards.view(2, 4)
    ref = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-6)).view(-1)
    torch.testing.assert_close(a, ref)


def test_uniform_group_and_single_sample_give_zero():
    # eight fp32 rewards of 0.1 do not average to exactly 0.1: the naive formula gives ~0.007
    rewards = torch.tensor([0.1] * 8 + [1.0, 0.0] * 4)
    a = group_advantages(rewards, 8)
    assert torch.equal(a[:8], torch.zeros(8))
    assert torch.all(a[8:] != 0)
    assert torch.equal(group_advantages(torch.tensor([1.0, 0.0]), 1), torch.zeros(2))


def test_bad_shapes_are_explained():
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 4), 4)


def test_mixed_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.1, 0.0, 0.0])
    assert mixed_groups(rewards, 2).tolist() == [False, True, False]
