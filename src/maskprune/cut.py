"""The uniform cut: integer unit counts that honour the budget, and the units each layer keeps.

Pure functions of the learned state; nothing here touches a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import MaskPruneError
from .minimax import num_cut
from .structure import Structure

__all__ = [
    "CutPlan",
    "KeptUnits",
    "plan_cut",
    "feasible_plans",
    "candidate_splits",
    "kept_indices",
    "select_units",
    "hard_masks",
    "cut_mass_share",
    "ShapeCandidate",
    "candidate_shapes",
    "SHAPE_SHARES",
    "best_layer_subsequence",
]


@dataclass(frozen=True)
class CutPlan:
    """How many units every row of every layer loses, and the resulting size."""

    k_head: int
    k_ffn: int
    params: int
    budget: int

    def to_dict(self) -> dict[str, int]:
        return {"k_head": self.k_head, "k_ffn": self.k_ffn, "params": self.params, "budget": self.budget}


def plan_cut(
    structure: Structure, *, sigma_head: float, budget: int, head_multiple: int = 1, ffn_multiple: int = 1
) -> CutPlan:
    """Integer counts from the learned fractions, adjusted so the exported size meets the budget.

    Heads take ``ceil(sigma_head * U)`` (the learned head sparsity); FFN channels, the finest unit,
    then fill the budget: the fewest channels cut such that the size is at or under ``budget``.
    Hence ``budget - unit < params <= budget`` with ``unit`` = one FFN step across all layers
    (``ffn_multiple`` channels per layer): the budget, not ``sigma_ffn``, sets the FFN count, since
    the budget is the contract. If no FFN count fits with that head count (too few heads cut), or
    the heads alone overshoot the budget by more than a unit (too many cut), the nearest head count
    that lands within one unit is used. Kept counts are rounded to multiples of ``head_multiple`` /
    ``ffn_multiple`` when asked.

    Raises :class:`MaskPruneError` if no uniform cut reaches the budget.
    """
    s = structure
    u_h = s.head.units_per_row
    k0 = _round_cut(num_cut(sigma_head, u_h), u_h, head_multiple)
    feasible = feasible_plans(s, budget, head_multiple=head_multiple, ffn_multiple=ffn_multiple)
    # Within one unit of the budget, the head count nearest the learned one (ties: more heads cut);
    # if none is that close (rounding), the smallest slack.
    tight = _tight(s, feasible, budget, ffn_multiple)
    if tight:
        return min(tight, key=lambda p: (abs(p.k_head - k0), -p.k_head))
    return min(feasible, key=lambda p: (budget - p.params, abs(p.k_head - k0)))


def candidate_splits(
    structure: Structure, budget: int, *, head_multiple: int = 1, ffn_multiple: int = 1
) -> list[CutPlan]:
    """The splits worth comparing: the feasible plans within one FFN step of the budget (a plan further
    under it cuts more than asked), or, if rounding leaves none that close, the one with the least slack."""
    feasible = feasible_plans(structure, budget, head_multiple=head_multiple, ffn_multiple=ffn_multiple)
    return _tight(structure, feasible, budget, ffn_multiple) or [min(feasible, key=lambda p: budget - p.params)]


def _tight(s: Structure, plans: list[CutPlan], budget: int, ffn_multiple: int) -> list[CutPlan]:
    step = s.num_layers * s.ffn.rows * s.ffn.params_per_unit * max(1, ffn_multiple)
    return [p for p in plans if budget - p.params < step]


def feasible_plans(
    structure: Structure, budget: int, *, head_multiple: int = 1, ffn_multiple: int = 1
) -> list[CutPlan]:
    """Every uniform split of the budget between heads and FFN channels: for each head count per row
    (kept count a multiple of ``head_multiple``), the fewest FFN channels cut that meet the budget, in
    increasing head count. The candidates :func:`plan_cut` and the split search choose from.

    Raises :class:`MaskPruneError` if no uniform cut reaches the budget.
    """
    s = structure
    u_h = s.head.units_per_row
    feasible: list[CutPlan] = []
    for k_h in range(u_h):
        if (head_multiple > 1 and (u_h - k_h) % head_multiple) or not s.head_cut_allowed(k_h):
            continue
        k_f = _fill(s, k_h, budget, ffn_multiple)
        if k_f is not None:
            feasible.append(CutPlan(k_h, k_f, int(s.params_after(k_h, k_f)), budget))
    if not feasible:
        raise MaskPruneError(
            "no layer-uniform cut reaches the parameter budget",
            expected=f"a budget of at least {s.min_params():,} parameters (one unit of each kind left per layer)",
            found=f"budget {budget:,}",
            fix="ask for a lower --sparsity",
        )
    return feasible


def _round_cut(k: int, units: int, multiple: int) -> int:
    """Smallest cut >= k whose kept count is a multiple of ``multiple`` (if one exists)."""
    if multiple <= 1:
        return k
    for kk in range(k, units):
        if (units - kk) % multiple == 0:
            return kk
    return k


def _fill(s: Structure, k_head: int, budget: int, multiple: int) -> int | None:
    """Fewest FFN channels to cut per layer (kept count a multiple of ``multiple``) to meet budget."""
    u_f = s.ffn.units_per_row
    per_channel = s.num_layers * s.ffn.rows * s.ffn.params_per_unit
    excess = s.params_after(k_head, 0) - budget
    k = max(0, -(-int(excess) // per_channel)) if excess > 0 else 0
    k = _round_cut(k, u_f, multiple)
    if k > u_f - 1 or (multiple > 1 and (u_f - k) % multiple):
        return None
    return k


def kept_indices(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the indices of the ``U - k`` largest-magnitude entries, ascending.

    mask: ``[L, rows, U]``; returns ``[L, rows, U - k]`` (long).
    """
    order = torch.sort(mask.detach().abs(), dim=-1, stable=True).indices  # [L, rows, U]
    return torch.sort(order[..., k:], dim=-1).values  # [L, rows, U - k]


def hard_masks(mask: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The mask with every cut unit at 0 and kept units at their learned values."""
    keep = torch.zeros_like(mask, dtype=torch.bool).scatter_(-1, kept, True)
    return torch.where(keep, mask.detach(), torch.zeros_like(mask))


def cut_mass_share(mask: torch.Tensor, kept: torch.Tensor) -> float:
    """``sum |m| over cut units / sum |m|`` (docs/method.md, invariant 6). The cut units' mass is summed
    directly (not as total minus kept), so a cut whose masks are exactly zero gives exactly 0 whatever order
    the machine's sum kernels add in."""
    m = mask.detach().abs()
    total = float(m.sum())
    if total == 0.0:
        return 0.0
    is_cut = torch.ones_like(m, dtype=torch.bool).scatter_(-1, kept, False)
    return float(m[is_cut].sum()) / total


@dataclass(frozen=True)
class KeptUnits:
    """Per layer, the unit indices kept: head ``[L, rows, U_h - k_h]``, ffn ``[L, 1, U_f - k_f]``."""

    head: torch.Tensor
    ffn: torch.Tensor

    def to_lists(self) -> dict[str, list]:
        return {"head": self.head.tolist(), "ffn": self.ffn[:, 0].tolist()}


def select_units(head: torch.Tensor, ffn: torch.Tensor, plan: CutPlan) -> KeptUnits:
    """The units the plan keeps: in every row the ones with the largest masks (or scores)."""
    return KeptUnits(kept_indices(head, plan.k_head), kept_indices(ffn, plan.k_ffn))


@dataclass(frozen=True)
class ShapeCandidate:
    """A whole-model shape the shape search measures: ``drop_layers`` layers removed and ``hidden`` channels
    kept, before heads and FFN channels take the rest of the budget; ``layer_share`` / ``hidden_share`` are the
    shares of the parameters to remove that were asked of each axis."""

    drop_layers: int
    hidden: int
    layer_share: float | None  # None: a shape the user fixed, not one of the searched shares
    hidden_share: float | None


SHAPE_SHARES: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
"""The shares of the parameters to remove that the shape search offers to depth and to hidden width."""


def candidate_shapes(
    *,
    removed: int,
    num_layers: int,
    hidden: int,
    layer_params: int,
    hidden_params,
    axes: tuple[str, ...],
    hidden_multiple: int = 1,
    hidden_ok: Callable[[int], bool] = lambda width: True,
    shares: tuple[float, ...] = SHAPE_SHARES,
) -> list[ShapeCandidate]:
    """The distinct shapes that give depth a share ``b`` and hidden width a share ``a`` of the ``removed``
    parameters (``a + b <= 1``; heads and FFN channels take the rest), each axis only where ``axes`` allows it.
    Layers dropped: ``b * removed / layer_params`` rounded down (at most ``num_layers - 1``); hidden channels
    cut: ``a * removed`` over what one channel owns once the layers are dropped (``hidden_params(layers_left)``),
    rounded down so the kept width is a multiple of ``hidden_multiple`` (at least one multiple) that ``hidden_ok``
    accepts (the family's config: Llama's needs a multiple of the head count). Cutting fewer channels keeps every
    shape at or above the budget, so heads and FFN channels can fill it exactly."""
    depth = shares if "layers" in axes else (0.0,)
    width = shares if "hidden" in axes else (0.0,)
    out: dict[tuple[int, int], ShapeCandidate] = {}
    for b in depth:
        for a in width:
            if a + b > 1.0 + 1e-9:
                continue
            drop = min(num_layers - 1, int(b * removed // layer_params))
            per_channel = hidden_params(num_layers - drop)
            cut = int(a * removed // per_channel)
            kept = max(hidden_multiple, -(-(hidden - cut) // hidden_multiple) * hidden_multiple)
            kept = min(hidden, kept)
            while kept < hidden and not hidden_ok(kept):  # the next width up the config accepts (hidden is one)
                kept = min(hidden, kept + hidden_multiple)
            out.setdefault((drop, kept), ShapeCandidate(drop, kept, b, a))
    return list(out.values())


def best_layer_subsequence(scores: list[float], pattern: list, target: list) -> list[int] | None:
    """The layers to keep: indices ``i_1 < ... < i_m`` (``m = len(target)``) whose per-layer attributes
    ``pattern[i_j]`` equal ``target[j]`` with the largest sum of ``scores``; None where no such choice exists.

    ``target`` is the per-layer pattern (sliding / global attention, NoPE layers) that a model of ``m`` layers of
    the family derives from its config; engines that recompute it from the layer index (llama.cpp does for Gemma
    2 / 3) then compute what transformers does. Without a pattern every choice matches and this is the top ``m``.
    """
    n, m = len(pattern), len(target)
    neg = float("-inf")
    best = [[0.0] + [neg] * m for _ in range(n + 1)]  # best[i][j]: first i layers, first j targets matched
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            take = best[i - 1][j - 1] + scores[i - 1] if pattern[i - 1] == target[j - 1] else neg
            best[i][j] = max(best[i - 1][j], take)
    if best[n][m] == neg:
        return None
    kept, j = [], m
    for i in range(n, 0, -1):
        if j and best[i][j] != best[i - 1][j]:
            kept.append(i - 1)
            j -= 1
    return sorted(kept)
