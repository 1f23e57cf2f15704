"""The split search: how a uniform cut divides the budget between attention heads and FFN channels.

The budget fixes how many parameters go, not where. With a one-shot importance order over the units
(the prior of the default recipe, or a baseline's scores), every head count per row has one matching
FFN count that lands on the budget (:func:`maskprune.cut.feasible_plans`). The search cuts the
lowest-scored units at each of these splits in turn and measures the distillation loss of the cut
model against the dense one on a few calibration windows; the split with the lowest loss is the one
the run starts from. This is what decides whether heads go at all: a head is cut where losing it costs
less than losing the FFN channels of the same size, measured on the model, not assumed.

Cost: one teacher forward and one student forward per candidate split on ``windows`` (16 windows of
128 tokens by default: a few seconds per candidate for a 135M model on a CPU core).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .cut import CutPlan, hard_masks, kept_indices
from .losses import KLDirection, kl_divergence
from .masks import MaskSet, bypass
from .offload import home_device

log = logging.getLogger(__name__)

__all__ = ["SplitResult", "search_split"]


@dataclass(frozen=True)
class SplitResult:
    """The candidate splits with their measured loss, and the chosen one (lowest loss)."""

    candidates: tuple[CutPlan, ...]
    losses: tuple[float, ...]
    tokens: int

    @property
    def best(self) -> CutPlan:
        return self.candidates[min(range(len(self.losses)), key=lambda i: (self.losses[i], self.candidates[i].k_head))]

    def to_dict(self) -> dict:
        return {
            "metric": "KL to the dense model after the cut (mean per token)",
            "tokens": self.tokens,
            "candidates": [{**asdict(p), "kl": loss} for p, loss in zip(self.candidates, self.losses)],
            "chosen": asdict(self.best),
        }


@torch.no_grad()
def search_split(
    model: nn.Module,
    masks: MaskSet,
    head_scores: torch.Tensor,
    ffn_scores: torch.Tensor,
    candidates: list[CutPlan],
    windows: torch.Tensor,
    *,
    batch_size: int,
    direction: KLDirection = "student_teacher",
    autocast_dtype: torch.dtype | None = None,
) -> SplitResult:
    """Measure each candidate split: cut the ``k_head`` / ``k_ffn`` lowest-scored units of every row
    (``head_scores`` ``[L, rows, U_h]``, ``ffn_scores`` ``[L, 1, U_f]``, higher = keep) by hard masks, and
    take the KL to the unmasked model on ``windows`` ``[N, T]``. The masks are restored afterwards.
    A single candidate is returned without a forward."""
    if len(candidates) == 1:
        return SplitResult(tuple(candidates), (0.0,), 0)
    saved = {k: masks.values(k).detach().clone() for k in ("head", "ffn")}
    ones_h, ones_f = torch.ones_like(head_scores), torch.ones_like(ffn_scores)
    hard = [  # kept units at 1, cut ones at 0
        (
            hard_masks(ones_h, kept_indices(head_scores, p.k_head)),
            hard_masks(ones_f, kept_indices(ffn_scores, p.k_ffn)),
        )
        for p in candidates
    ]
    device = home_device(model)
    totals = [0.0] * len(candidates)
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            starts = range(0, windows.shape[0], batch_size)
            quiet = not log.isEnabledFor(logging.INFO)
            for i in tqdm(starts, desc=f"split search ({len(candidates)} candidates)", disable=quiet):
                batch = windows[i : i + batch_size].to(device)
                with bypass(model, masks):
                    teacher = model(input_ids=batch, use_cache=False).logits
                n = batch.numel()
                for j, (h, f) in enumerate(hard):
                    masks.set_values_("head", h)
                    masks.set_values_("ffn", f)
                    student = model(input_ids=batch, use_cache=False).logits
                    totals[j] += float(kl_divergence(student, teacher, direction=direction)) * n
                tokens += n
    finally:
        masks.set_values_("head", saved["head"])
        masks.set_values_("ffn", saved["ffn"])
        model.train(was_training)
    return SplitResult(tuple(candidates), tuple(t / max(1, tokens) for t in totals), tokens)
