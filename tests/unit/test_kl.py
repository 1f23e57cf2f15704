"""The blocked KL (value and hand-formed gradient) equals the plain autograd definition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maskprune.losses import kl_divergence


def reference_kl(student: torch.Tensor, teacher: torch.Tensor, direction: str) -> torch.Tensor:
    log_s = F.log_softmax(student.float(), dim=-1)
    log_t = F.log_softmax(teacher.float(), dim=-1)
    if direction == "student_teacher":
        kl = (log_s.exp() * (log_s - log_t)).sum(-1)
    else:
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return kl.mean()


def _logits(dtype, seed=0, shape=(3, 7, 301)):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g) * 4
    return base.to(dtype), (base + torch.randn(*shape, generator=g) * 2).to(dtype)


@pytest.mark.parametrize("direction", ["student_teacher", "teacher_student"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4, 16, 1000])
def test_blocked_kl_value_and_gradient(direction, dtype, rows):
    s0, t = _logits(dtype)
    s_ref = s0.clone().requires_grad_(True)
    want = reference_kl(s_ref, t, direction)
    want.backward()
    s_new = s0.clone().requires_grad_(True)
    got = kl_divergence(s_new, t, direction=direction, chunk_tokens=rows)
    (got * 3.0).backward()  # an upstream gradient other than 1 reaches the student logits scaled
    assert got.dtype == torch.float32
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-7)
    assert s_new.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2e-2 * float(s_ref.grad.abs().max())
    torch.testing.assert_close(s_new.grad.float(), 3.0 * s_ref.grad.float(), atol=tol, rtol=1e-2)


def test_blocked_kl_is_zero_for_equal_logits_and_positive_otherwise():
    s, t = _logits(torch.float32, seed=1)
    for direction in ("student_teacher", "teacher_student"):
        assert float(kl_divergence(s, s.clone(), direction=direction)) == pytest.approx(0.0, abs=1e-6)
        assert float(kl_divergence(s, t, direction=direction)) > 0.01


def test_blocked_kl_under_autocast_and_without_grad():
    s, t = _logits(torch.bfloat16, seed=2)
    want = reference_kl(s, t, "teacher_student")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = kl_divergence(s, t, direction="teacher_student")
    with torch.no_grad():
        got_ng = kl_divergence(s.requires_grad_(True), t, direction="teacher_student")
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert float(got_ng) == pytest.approx(float(want), rel=1e-5) and not got_ng.requires_grad


def test_teacher_gets_no_gradient_and_shapes_are_checked():
    s, t = _logits(torch.float32, seed=3)
    s.requires_grad_(True)
    t.requires_grad_(True)
    kl_divergence(s, t).backward()
    assert t.grad is None and s.grad is not None
    with pytest.raises(ValueError, match="student logits"):
        kl_divergence(s, t[..., :-1])
