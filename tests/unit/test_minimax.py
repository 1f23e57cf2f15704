"""The update rules against hand-computed values (docs/method.md invariant 5)."""

import math

import torch

from maskprune import minimax


def test_num_cut_is_ceil_capped_below_units():
    assert minimax.num_cut(0.0, 5) == 0
    assert minimax.num_cut(0.5, 4) == 2
    assert minimax.num_cut(0.3, 10) == 3  # 0.3*10 = 3.0000000000000004 in floats: still 3
    assert minimax.num_cut(0.31, 10) == 4
    assert minimax.num_cut(0.99, 4) == 3  # never every unit of a row
    assert minimax.num_cut(1.0, 1) == 0


def test_proximal_step_scales_only_the_k_smallest():
    m = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.6]])
    out = minimax.proximal_step(m, 2, eta1=0.5, y=1.0)  # factor 1 / (1 + 2 * 0.5 * 1) = 0.5
    expected = torch.tensor([[0.9, 0.05, 0.5, 0.15], [0.1, 0.8, 0.7, 0.3]])
    assert torch.allclose(out, expected)
    assert torch.equal(minimax.proximal_step(m, 0, 0.5, 1.0), m)
    assert torch.equal(minimax.proximal_step(m, 2, 0.5, 0.0), m)
    # batched over layers: [L, rows, U]
    out3 = minimax.proximal_step(m[None].repeat(3, 1, 1), 1, eta1=1.0, y=2.0)  # factor 1/5
    assert torch.allclose(out3[2, 0], torch.tensor([0.9, 0.02, 0.5, 0.3]))


def test_cut_mass_and_next_smallest():
    m = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    assert torch.allclose(minimax.cut_mass(m, 2), torch.tensor([0.1**2 + 0.3**2]))
    assert torch.allclose(minimax.cut_mass(m, 0), torch.tensor([0.0]))
    assert torch.allclose(minimax.next_smallest_sq(m, 2), torch.tensor([0.25]))  # 3rd smallest = 0.5
    assert torch.allclose(minimax.next_smallest_sq(m, 4), torch.tensor([0.81]))  # capped at Dim(m)
    # mean over rows, divided by U
    m2 = torch.tensor([[0.9, 0.1, 0.5, 0.3], [1.0, 1.0, 0.0, 0.2]])
    assert math.isclose(minimax.sparsity_violation(m2, 2), ((0.01 + 0.09) + (0.0 + 0.04)) / 2 / 4, rel_tol=1e-6)


def test_smallest_mask_ties_are_deterministic():
    m = torch.tensor([0.5, 0.5, 0.5, 1.0])
    assert minimax.smallest_mask(m, 2).tolist() == [True, True, False, False]


def test_sigma_step_straight_through_and_clip():
    # sigma - eta2 * (y * a - z * c) = 0.2 - 0.1 * (2 * 0.25 - 3 * 0.5) = 0.3
    assert math.isclose(
        minimax.sigma_step(0.2, y=2.0, z=3.0, next_sq_mean=0.25, weight=0.5, eta2=0.1, sigma_max=0.75), 0.3
    )
    assert minimax.sigma_step(0.7, y=0.0, z=100.0, next_sq_mean=1.0, weight=1.0, eta2=1.0, sigma_max=0.75) == 0.75
    assert minimax.sigma_step(0.1, y=100.0, z=0.0, next_sq_mean=1.0, weight=1.0, eta2=1.0, sigma_max=0.75) == 0.0


def test_multiplier_ascent():
    assert math.isclose(minimax.y_step(1.0, violation=0.5, eta3=2.0), 2.0)
    assert math.isclose(minimax.z_step(1.0, size_ratio=0.9, target_ratio=0.8, eta4=5.0), 1.5)
    assert minimax.z_step(0.1, size_ratio=0.5, target_ratio=0.8, eta4=5.0) == 0.0  # projected at 0


def test_budget_warmup_and_prox_interval():
    # warm-up over 5 of 10 steps toward 0.6: step 0 -> 1 - 0.4 * 1/5
    assert math.isclose(minimax.budget_ratio(0, 10, 0.6, 0.5), 0.92)
    assert math.isclose(minimax.budget_ratio(4, 10, 0.6, 0.5), 0.6)
    assert math.isclose(minimax.budget_ratio(9, 10, 0.6, 0.5), 0.6)
    assert minimax.ffn_prox_interval(0, 100) == 10
    assert minimax.ffn_prox_interval(99, 100) == 1
    assert minimax.ffn_prox_interval(50, 101) == round(10 - 9 * 0.5)
    assert minimax.ffn_prox_interval(0, 1) == 1


def test_cap_smallest_clips_only_the_k_smallest():
    m = torch.tensor([[0.9, 0.1, 0.5, 0.3], [1.0, 0.8, 0.7, 0.6]])
    out = minimax.cap_smallest(m, 2, 0.2)
    assert torch.allclose(out, torch.tensor([[0.9, 0.1, 0.5, 0.2], [1.0, 0.8, 0.2, 0.2]]))
    assert torch.equal(minimax.cap_smallest(m, 0, 0.0), m)
    assert torch.equal(minimax.cap_smallest(m, 4, 0.0), torch.zeros_like(m))
