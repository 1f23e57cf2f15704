"""The minimax updates of MaskPrune as pure functions of tensors (paper section 3.2, Algorithm 1).

Symbol table (paper -> code). Everything here is scale-free, as docs/method.md states, so one set of
rates works for 9 heads and for 11008 FFN channels, and for 135M or 70B parameters:

=====================  ===========================================================================
paper                  code
=====================  ===========================================================================
``m``                  ``mask``: a ``[layers, rows, units_per_row]`` tensor in [0, 1] per unit kind
``s`` (units cut)      ``sigma`` = s / units_per_row, a fraction in [0, (U-1)/U]; the integer count
                       cut per row is ``k = ceil(sigma * U)`` (:func:`num_cut`)
``||m||_{s,2}^2``      :func:`cut_mass`: sum of squares of the k smallest entries of each row
``y``                  ``y``: multiplier of the sparsity term, updated by
                       ``y += eta3 * sum_kinds violation`` where ``violation`` =
                       mean over layers and rows of ``||m||^2_{k} / U`` (:func:`sparsity_violation`),
                       i.e. the share of a full row's squared mass still on the units to be cut.
``z``                  ``z``: multiplier of the resource term, in units of the dense size ``M``:
                       ``z = max(0, z + eta4 * (M(s)/M - rho(t)))`` (:func:`z_step`), where
                       ``rho(t)`` is the kept-size ratio the budget asks for at step t.
``eta1``               decay rate of the proximal step: ``m <- m / (1 + 2 eta1 y)`` on the k smallest
``eta2``               rate of the straight-through ``sigma`` step (:func:`sigma_step`):
                       ``sigma -= eta2 * (y * a - z * c)``, where ``a`` = mean over layers and
                       rows of the squared (k+1)-th smallest mask (the paper's proxy
                       ``m^2_{least-min(Dim(m), s+1)}``) and ``c`` the resource weight of the
                       kind (``Structure.resource_weight``; ``--resource-weight``): by default
                       its share of the dense size, ``-dM/dsigma / M``.
``eta3``, ``eta4``     ascent rates of ``y`` and ``z``
=====================  ===========================================================================

Mapping: the paper's gradient with respect to the count ``s`` of one kind is
``y * sum_rows m^2_(s+1) - z * L * rows * c_unit`` (``c_unit`` parameters per unit). In fractions,
``d/dsigma = U * d/ds``; we divide the sparsity part by the number of rows (so it does not grow with
depth) and measure ``z`` in units of ``M``, which turns ``z * dM/dsigma`` into ``z * share``. A
per-kind positive rescaling of the two terms against each other moves where the kinds balance
(``y * a_head / c_head = y * a_ffn / c_ffn``), i.e. how the budget is split between heads and FFN.
The paper's literal form (``unit``: balance per parameter, with a mask term that counts a head like
one channel) cuts heads first, and on SmolLM2 took 6 of 9 heads for a 20% budget before any FFN
channel, its loss 3x that of ``share`` at the same step; see bench/results for the measurements.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "num_cut",
    "smallest_indices",
    "smallest_mask",
    "proximal_step",
    "cap_smallest",
    "cut_mass",
    "next_smallest_sq",
    "sparsity_violation",
    "sparsity_penalty",
    "geometric_schedule",
    "sigma_step",
    "y_step",
    "z_step",
    "budget_ratio",
    "ffn_prox_interval",
]

_EPS = 1e-6


def num_cut(sigma: float, units_per_row: int) -> int:
    """``ceil(sigma * U)``, at most ``U - 1`` so a row never loses every unit."""
    k = math.ceil(sigma * units_per_row - _EPS)
    return max(0, min(units_per_row - 1, k))


def smallest_indices(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` smallest-magnitude entries of each row.

    mask: ``[..., U]``; returns ``[..., k]`` (long). Ties break toward the lower index (stable sort),
    so the choice is deterministic.
    """
    order = torch.sort(mask.detach().abs(), dim=-1, stable=True).indices  # [..., U]
    return order[..., :k]


def smallest_mask(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean ``[..., U]``: True on the ``k`` smallest-magnitude entries of each row."""
    out = torch.zeros_like(mask, dtype=torch.bool)
    if k > 0:
        out.scatter_(-1, smallest_indices(mask, k), True)
    return out


def proximal_step(mask: torch.Tensor, k: int, eta1: float, y: float) -> torch.Tensor:
    """Prox of ``eta1 * y * ||m||^2_{k}``: the k smallest entries of each row times 1/(1+2 eta1 y).

    mask: ``[..., U]``; returns a new tensor of the same shape.
    """
    if k == 0 or y == 0.0:
        return mask.clone()
    factor = 1.0 / (1.0 + 2.0 * eta1 * y)
    scale = torch.where(smallest_mask(mask, k), torch.full_like(mask, factor), torch.ones_like(mask))
    return mask * scale


def cap_smallest(mask: torch.Tensor, k: int, cap: float) -> torch.Tensor:
    """The ``k`` smallest-magnitude entries of each row clipped to at most ``cap``; the rest unchanged.

    mask: ``[..., U]``; returns a new tensor of the same shape.
    """
    if k == 0:
        return mask.clone()
    return torch.where(smallest_mask(mask, k), mask.clamp(max=cap), mask)


def cut_mass(mask: torch.Tensor, k: int) -> torch.Tensor:
    """``||m||^2_{k}`` per row: sum of squares of the k smallest-magnitude entries. ``[..., U] -> [...]``."""
    if k == 0:
        return mask.new_zeros(mask.shape[:-1])
    sq = torch.sort(mask.detach().abs(), dim=-1).values[..., :k] ** 2
    return sq.sum(dim=-1)


def next_smallest_sq(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Square of the (k+1)-th smallest magnitude of each row (index capped at U-1). ``[..., U] -> [...]``."""
    u = mask.shape[-1]
    vals = torch.sort(mask.detach().abs(), dim=-1).values  # [..., U]
    return vals[..., min(k, u - 1)] ** 2


def sparsity_violation(mask: torch.Tensor, k: int) -> float:
    """Mean over all rows of ``||m||^2_k / U``: 0 when the units to cut are already at 0."""
    return float(cut_mass(mask, k).mean()) / mask.shape[-1]


def sparsity_penalty(values: torch.Tensor, k: int) -> torch.Tensor:
    """Differentiable ``mean over rows of ||m||^2_k / U`` (the quantity :func:`sparsity_violation`
    measures), for mask types without a closed-form proximal step (L0): ``y`` times it enters the
    loss, so the gradient step does what the proximal step does for the uniform masks."""
    if k == 0:
        return values.sum() * 0.0
    idx = smallest_indices(values, k)  # [..., k], chosen on the detached values
    return (torch.gather(values, -1, idx) ** 2).sum(-1).mean() / values.shape[-1]


def geometric_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """``start * (end / start) ** (step / (total_steps - 1))``: a log-linear fall from start to end."""
    if total_steps <= 1:
        return end
    return start * (end / start) ** (min(step, total_steps - 1) / (total_steps - 1))


def sigma_step(
    sigma: float, *, y: float, z: float, next_sq_mean: float, weight: float, eta2: float, sigma_max: float
) -> float:
    """Straight-through step on the cut fraction sigma of one unit kind, clipped to [0, sigma_max].

    ``next_sq_mean``: mean over rows of :func:`next_smallest_sq` (the sparsity term's gradient proxy);
    ``weight``: the kind's resource weight ``c`` (> 0), e.g. its share of the dense size.
    """
    grad = y * next_sq_mean - z * weight
    return min(max(sigma - eta2 * grad, 0.0), sigma_max)


def y_step(y: float, *, violation: float, eta3: float) -> float:
    """Ascent on the sparsity multiplier; ``violation`` >= 0 summed over unit kinds."""
    return y + eta3 * violation


def z_step(z: float, *, size_ratio: float, target_ratio: float, eta4: float) -> float:
    """Projected ascent on the resource multiplier: ``max(0, z + eta4 (M(s)/M - rho))``."""
    return max(0.0, z + eta4 * (size_ratio - target_ratio))


def budget_ratio(step: int, total_steps: int, final_ratio: float, warmup_share: float) -> float:
    """Kept-size ratio asked for at ``step``: falls linearly from 1 to ``final_ratio`` over the
    first ``warmup_share`` of the run, then holds."""
    warm = max(1, round(warmup_share * total_steps))
    progress = min(1.0, (step + 1) / warm)
    return 1.0 - (1.0 - final_ratio) * progress


def ffn_prox_interval(step: int, total_steps: int, start: int = 10, end: int = 1) -> int:
    """FFN proximal interval ``k``: falls linearly from ``start`` to ``end`` over the run."""
    if total_steps <= 1:
        return end
    frac = step / (total_steps - 1)
    return max(1, round(start + (end - start) * frac))
