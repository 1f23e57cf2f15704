"""How the masks move: their optimizer, their learning-rate schedule and their start from a one-shot prior.

Why not plain AdamW on the masks (the paper's choice): AdamW divides each mask's gradient by that
mask's own running RMS, so every mask moves by about the learning rate per step whatever the size of
its gradient. A unit that matters (large gradient) and one that does not (tiny gradient) walk at the
same speed; the walk is then mostly noise, and which units sit lowest when the budget arrives is
decided by that noise (docs/method.md, "Why the masks start from a prior and share a second moment").

:class:`LayerAdam` keeps Adam's first moment per mask but *one* second moment per layer of a mask
tensor (the mean of the squared gradients over that layer's units). The step of a unit is then
proportional to its gradient relative to the layer's typical gradient: still scale-free (one learning
rate works for 9 heads and 11008 channels, for 135M and 70B models), but the units whose removal the
loss feels most move fastest. A step whose gradient is exactly zero everywhere (the teacher point,
where student and teacher coincide) is skipped without advancing the moment estimates.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

__all__ = ["LayerAdam", "cosine_factor", "prior_masks"]


class LayerAdam(torch.optim.Optimizer):
    """Adam with one second moment per leading index (layer) of each parameter.

    For a parameter ``p`` of shape ``[L, ...]`` with gradient ``g``:
    ``m = b1 m + (1 - b1) g``; ``v_l = b2 v_l + (1 - b2) mean(g_l^2)``;
    ``p -= lr * m_hat / (sqrt(v_hat_l) + eps)`` (bias-corrected). One-dimensional parameters share one
    second moment. No weight decay: the proximal step is the masks' only shrinkage.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-12,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, found {lr}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                g = p.grad
                if g is None or not bool(g.any()):
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float64)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros(p.shape[:1] + (1,) * (p.dim() - 1), dtype=p.dtype, device=p.device)
                st["step"] += 1
                t = float(st["step"])
                sq = (
                    (g * g).reshape(g.shape[0], -1).mean(1).view_as(st["exp_avg_sq"])
                    if p.dim() > 1
                    else (g * g).mean().view_as(st["exp_avg_sq"])
                )
                st["exp_avg"].mul_(b1).add_(g, alpha=1.0 - b1)
                st["exp_avg_sq"].mul_(b2).add_(sq, alpha=1.0 - b2)
                denom = (st["exp_avg_sq"] / (1.0 - b2**t)).sqrt_().add_(group["eps"])
                p.addcdiv_(st["exp_avg"], denom, value=-group["lr"] / (1.0 - b1**t))
        return None


def cosine_factor(step: int, total: int) -> float:
    """Multiplier of the learning rate at ``step`` of ``total``: 1 at step 0, falling to 0 at ``total``
    along half a cosine (1 when ``total`` <= 0: no schedule)."""
    if total <= 0:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(max(step, 0), total) / total))


def prior_masks(scores: torch.Tensor, spread: float) -> torch.Tensor:
    """Initial masks from one-shot importance ``scores`` ``[..., U]`` (higher = keep).

    Per row, the unit ranked r-th from the least important (r = 0 .. U-1) starts at
    ``1 - spread * (1 - r / (U - 1))``: the most important at 1, the least at ``1 - spread``. The prior
    sets the order the proximal step meets the units in (it shrinks the smallest masks first), and the
    gradient can still reorder them. Ties keep the lower index lower (stable sort).
    """
    if not 0.0 <= spread < 1.0:
        raise ValueError(f"spread must be in [0, 1), found {spread}")
    u = scores.shape[-1]
    if u == 1:
        return torch.ones_like(scores, dtype=torch.float32)
    order = torch.sort(scores.detach().float(), dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(u, device=scores.device).expand_as(order))
    return 1.0 - spread * (1.0 - rank.float() / (u - 1))
