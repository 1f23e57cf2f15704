"""A one-shot baseline's run: unit scores (one pass, or layer by layer), the split, FLAP's bias
compensation, and the same uniform cut as the learned method."""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from ..baselines import activation_stats, input_means, unit_scores
from ..compensate import Parts, compensation_parts, extra_params
from ..config import PruneConfig
from ..cut import KeptUnits, kept_indices, plan_cut
from ..masks import MaskSet
from ..outputs import Phases
from ..sequential import layerwise_scores
from ..structure import Structure
from .outcome import Outcome, measure_split, score_summary

__all__ = ["score_and_plan"]


def score_and_plan(
    cfg: PruneConfig,
    model,
    adapter,
    structure: Structure,
    windows: torch.Tensor,
    budget: int,
    device: torch.device,
    phases: "Phases",
    *,
    sigma_head: float | None = None,
    execution=None,
    scores: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """A one-shot baseline: unit scores on the calibration windows, the same uniform cut (the head share
    ``head_cut_fraction``, or measured by the split search), FLAP's bias compensation where it applies.
    Long because the steps depend on each other in this order: scores -> split -> plan -> the compensation's
    re-plan -> layer-by-layer scores on that plan. ``sigma_head``: the head share measured already (by the
    shape search), so no split search here. ``execution``: where the passes run (:mod:`maskprune.passes`).
    ``scores``: the units' scores measured already (the shape search's, for the shape it chose): no scoring pass,
    the units ranked are the units cut (a layer-by-layer calibration still scores again, on the cut prefix)."""
    calib = windows[: cfg.resolved_cut_samples()]
    compensate = cfg.bias_compensation == "on" or (
        cfg.bias_compensation == "auto" and cfg.method == "flap" and not cfg.reconstruct  # the re-fit replaces it
    )
    layerwise = cfg.resolved_layerwise_calibration()
    split = stats = None
    searched = cfg.resolved_split_search() and sigma_head is None
    sigma_head = cfg.head_cut_fraction if sigma_head is None else sigma_head
    if scores is not None or searched or not layerwise:
        with phases("score") if scores is None or compensate else contextlib.nullcontext():
            scores, stats = _one_pass(cfg, model, adapter, structure, calib, execution, scores, compensate)
    masks = MaskSet(structure).to(device).attach(model)  # all ones: nothing to fold
    if searched:
        with phases("split"):
            split = measure_split(cfg, model, masks, structure, scores, windows, budget, device)
        sigma_head = split.best.k_head / structure.head.units_per_row
    plan = plan_cut(
        structure, sigma_head=sigma_head, budget=budget, head_multiple=cfg.head_multiple, ffn_multiple=cfg.ffn_multiple
    )
    parts, extra = Parts(False, False), 0
    if compensate:
        parts = compensation_parts(cfg.bias_compensation, cfg.method, adapter, plan)
        for _ in range(3):  # the biases' own parameters come out of the budget (they depend on the kept counts)
            extra = extra_params(structure, model.config, adapter, parts, plan) if parts else 0
            replanned = plan_cut(
                structure,
                sigma_head=plan.k_head / structure.head.units_per_row,
                budget=budget - extra,
                head_multiple=cfg.head_multiple,
                ffn_multiple=cfg.ffn_multiple,
            )
            replanned = dataclasses.replace(replanned, budget=budget)
            if replanned == plan:
                break
            plan = replanned
        extra = extra_params(structure, model.config, adapter, parts, plan) if parts else 0
    if layerwise:
        with phases("score_layerwise"):
            *scores, stats = layerwise_scores(
                cfg.method, model, adapter, structure, masks, plan, calib, batch_size=cfg.batch_size, compensate=parts,
                execution=execution,
            )  # fmt: skip
    kept = KeptUnits(kept_indices(scores[0], plan.k_head), kept_indices(scores[1], plan.k_ffn))
    return Outcome(
        model,
        masks,
        None,
        plan,
        kept,
        split=split.to_dict() if split is not None else None,
        compensation=parts,
        means=input_means(stats) if parts else None,
        extra_params=extra,
        calibration="layerwise" if layerwise else "one-pass",
        scores=score_summary(cfg.method, scores, kept),
    )


def _one_pass(cfg, model, adapter, structure, calib, execution, scores, compensate) -> tuple:
    """``(scores, stats)``: the one-pass unit scores (``scores`` where measured already, by the shape search) and,
    for FLAP's compensation, the activation statistics of the model as it is now (its input means)."""
    stats = activation_stats(model, adapter, calib, cfg.batch_size, execution) if compensate else None
    if scores is None:
        bs, ex = cfg.batch_size, execution
        scores = unit_scores(cfg.method, model, adapter, structure, calib, batch_size=bs, stats=stats, execution=ex)
    return scores, stats
