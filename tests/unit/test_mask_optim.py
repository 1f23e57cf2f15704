"""The masks' optimizer, schedule and prior (mask_optim) against hand-computed values."""

import math

import pytest
import torch

from maskprune.mask_optim import LayerAdam, cosine_factor, prior_masks


def _one_step(opt_cls, grad: torch.Tensor, **kw) -> torch.Tensor:
    p = torch.nn.Parameter(torch.zeros_like(grad))
    opt = opt_cls([p], **kw)
    p.grad = grad.clone()
    opt.step()
    return p.detach()


def test_layer_adam_step_follows_the_gradient_size_within_a_layer():
    g = torch.tensor([[[1.0, 0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0, 1.0]]])  # [L=2, rows=1, U=4]
    out = _one_step(LayerAdam, g, lr=0.1)
    # layer 0: v = mean(g^2) = 0.25 -> unit 0 moves lr / 0.5 = 0.2, the others not at all
    assert torch.allclose(out[0, 0], torch.tensor([-0.2, 0.0, 0.0, 0.0]), atol=1e-6)
    # layer 1: v = 1 -> every unit moves lr
    assert torch.allclose(out[1, 0], torch.full((4,), -0.1), atol=1e-6)
    # AdamW per mask moves every unit with a non-zero gradient by lr whatever its size
    adam = _one_step(torch.optim.AdamW, torch.tensor([[[1.0, 1e-4, 0.0, 0.0]]]), lr=0.1, weight_decay=0.0)
    assert torch.allclose(adam[0, 0, :2], torch.tensor([-0.1, -0.1]), atol=1e-4)
    lay = _one_step(LayerAdam, torch.tensor([[[1.0, 1e-4, 0.0, 0.0]]]), lr=0.1)
    assert abs(float(lay[0, 0, 1])) < 1e-4  # a tiny gradient gives a tiny step


def test_layer_adam_is_scale_free_and_skips_all_zero_gradients():
    g = torch.randn(3, 2, 5)
    assert torch.allclose(_one_step(LayerAdam, g, lr=0.05), _one_step(LayerAdam, 1e-6 * g, lr=0.05), atol=1e-5)
    p = torch.nn.Parameter(torch.ones(2, 1, 3))
    opt = LayerAdam([p], lr=0.1)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(2, 1, 3)) and not opt.state[p]  # no step, no state, no count
    p.grad = torch.ones_like(p)
    opt.step()
    assert float(opt.state[p]["step"]) == 1.0


def test_layer_adam_two_steps_by_hand():
    p = torch.nn.Parameter(torch.zeros(1, 2))
    opt = LayerAdam([p], lr=1.0, betas=(0.5, 0.5), eps=0.0)
    for g in (torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])):
        p.grad = g
        opt.step()
    # step 1: m = [1, 0], v = 0.5 * 2 = 1 ... bias-corrected m_hat = [2, 0], v_hat = 2 -> p = -[2, 0] / sqrt(2)
    # step 2: m = [0.5, 1], v = 0.5 * 1 + 0.5 * 2 = 1.5; m_hat = m / 0.75, v_hat = 1.5 / 0.75 = 2
    first = torch.tensor([[-2.0, 0.0]]) / math.sqrt(2.0)
    second = -torch.tensor([[0.5, 1.0]]) / 0.75 / math.sqrt(2.0)
    assert torch.allclose(p.detach(), first + second, atol=1e-6)


def test_cosine_factor():
    assert cosine_factor(0, 10) == 1.0
    assert math.isclose(cosine_factor(5, 10), 0.5)
    assert cosine_factor(10, 10) == 0.0 and cosine_factor(12, 10) == 0.0
    assert cosine_factor(3, 0) == 1.0


def test_prior_masks_rank_and_spread():
    scores = torch.tensor([[[3.0, 1.0, 2.0, 0.5, 1.0]]])  # ties (1.0, 1.0): the lower index ranks lower
    m = prior_masks(scores, 0.2)
    assert torch.allclose(m, torch.tensor([[[1.0, 0.85, 0.95, 0.8, 0.9]]]))
    assert torch.equal(prior_masks(scores, 0.0), torch.ones_like(scores))
    assert torch.equal(prior_masks(torch.tensor([[[5.0]]]), 0.3), torch.ones(1, 1, 1))
    with pytest.raises(ValueError):
        prior_masks(scores, 1.0)
