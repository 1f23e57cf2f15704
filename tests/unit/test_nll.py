"""The row-blocked NLL used by evaluation equals torch's cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maskprune.losses import summed_nll


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 16, 1000])
def test_summed_nll_equals_cross_entropy_sum(dtype, rows):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 301, generator=g) * 4).to(dtype)
    targets = torch.randint(0, 301, (37,), generator=g)
    want = F.cross_entropy(logits.float(), targets, reduction="sum")
    got = summed_nll(logits, targets, rows=rows)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_summed_nll_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"expected logits \[n, V\]"):
        summed_nll(torch.zeros(4, 10), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        summed_nll(torch.zeros(2, 4, 10), torch.zeros(2, 4, dtype=torch.long))
