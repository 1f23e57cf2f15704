"""The top-k teacher's loss (losses.topk_kl): an exact KL over the teacher's k tokens and the tail."""

from __future__ import annotations

import pytest
import torch

from maskprune.losses import kl_divergence, teacher_topk, topk_kl


@pytest.mark.parametrize("direction", ["teacher_student", "student_teacher"])
def test_with_k_the_whole_vocabulary_it_is_the_full_kl(direction):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 40, generator=g) * 3, torch.randn(2, 5, 40, generator=g) * 3
    full = kl_divergence(s, t, direction=direction)
    assert float(topk_kl(s, *teacher_topk(t, 40), direction=direction)) == pytest.approx(float(full), rel=1e-5)


def test_by_hand_on_four_tokens_with_k_two():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])  # the teacher
    q = torch.tensor([0.4, 0.1, 0.2, 0.3])  # the student
    lp, idx, tail = teacher_topk(p.log()[None], 2)
    assert idx.tolist() == [[0, 1]] and float(tail.exp()) == pytest.approx(0.2, abs=1e-6)
    bins_p, bins_q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.4, 0.1, 0.5])
    expect = float((bins_p * (bins_p / bins_q).log()).sum())
    got = float(topk_kl(q.log()[None], lp, idx, tail, direction="teacher_student"))
    assert got == pytest.approx(expect, rel=1e-6)
    expect_rev = float((bins_q * (bins_q / bins_p).log()).sum())
    assert float(topk_kl(q.log()[None], lp, idx, tail, direction="student_teacher")) == pytest.approx(expect_rev, 1e-6)


def test_it_is_at_most_the_full_kl_and_zero_when_they_agree():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 7, 60, generator=g) * 2, torch.randn(3, 7, 60, generator=g) * 2
    for k in (1, 5, 20, 59):
        assert float(topk_kl(s, *teacher_topk(t, k))) <= float(kl_divergence(s, t, direction="teacher_student")) + 1e-6
    assert float(topk_kl(t, *teacher_topk(t, 8))) == pytest.approx(0.0, abs=1e-6)


def test_its_gradient_is_finite_and_moves_the_student_toward_the_teacher():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(4, 30, generator=g) * 2
    s = torch.zeros(4, 30, requires_grad=True)
    top = teacher_topk(t, 30)  # an empty tail: no nan from its -inf
    opt = torch.optim.SGD([s], lr=1.0)
    before = float(topk_kl(s, *top))
    for _ in range(50):
        opt.zero_grad()
        loss = topk_kl(s, *top)
        loss.backward()
        assert torch.isfinite(s.grad).all()
        opt.step()
    assert float(topk_kl(s, *top)) < 0.2 * before
