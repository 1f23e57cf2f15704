"""One stage sequence of a run: the dense evaluation, choosing the units, the cut, the export and the evaluations
of the exported model, into a staging folder; returns the run's report (the recipe writes it)."""

from __future__ import annotations

import copy
import logging
import shutil
import time
from pathlib import Path

import torch

from .. import distributed as D
from ..checkpoint import checkpoint_dir
from ..export import harden_
from ..models import load_model
from ..offload import disk_weights
from ..outputs import machine_info
from ..runreport import RunReport
from ..sequential import reconstruct_layerwise_, reconstruct_to_dense_
from ..structure import Structure
from ..version import __version__
from .context import RunContext
from .export import export, selection_sections, structure_sections
from .learned import learn_and_plan, validation_curve
from .oneshot import score_and_plan
from .outcome import Outcome, rebuild_for_export, weight_dtype
from .shape import apply_shape_, search_shape, wants_shape_search

__all__ = ["run_stage", "choose_units"]

log = logging.getLogger(__name__)


def run_stage(
    ctx: RunContext, folder: Path | None, student_eval: tuple | None = None, *, intermediate: bool = False
) -> RunReport | dict:
    """Evaluate the dense model (or take ``student_eval``, the (perplexity, zero-shot) of a distill student
    measured already), choose the units, cut, export into ``folder`` with ``masks.pt`` and ``metrics.jsonl``,
    evaluate the export; the report. ``intermediate``: the export is the next stage's input (prune + recovery's
    cut), evaluated only where ``eval_between`` says so. Secondary processes of a distributed run stop after
    learning and return ``{"rank", "final_state"}``."""
    cfg = ctx.cfg
    evaluate_export = not intermediate or cfg.resolved_eval_between()
    report = RunReport(
        __version__,
        cfg,
        {"source": ctx.loaded.source, "path": ctx.loaded.path, "model_type": ctx.adapter.model_type},
        {
            **machine_info(ctx.device),
            "processes": D.world(),
            "sharding": "fsdp2" if cfg.fsdp and D.world() > 1 else "replicated",
        },
    )
    if student_eval is not None:
        ppl_dense, zs_dense = student_eval
    else:
        ppl_dense, zs_dense = ctx.dense_evaluation()
    ckpt_dir = checkpoint_dir(ctx.out)
    outcome = choose_units(ctx, ckpt_dir)
    if not ctx.main:  # rank 0 alone cuts, exports, evaluates and writes
        log.info("rank %d done learning", D.rank())
        return {"rank": D.rank(), "final_state": outcome.state.to_dict() if outcome.state else None}
    if cfg.method == "maskprune":
        shutil.copy2(ckpt_dir / "metrics.jsonl", folder / "metrics.jsonl")
    soft = {"head": outcome.masks.head.detach().clone(), "ffn": outcome.masks.ffn.detach().clone()}
    ppl_before_cut, ppl_after_cut = _cut(ctx, outcome, ppl_dense)
    if cfg.reconstruct:
        with ctx.phases("reconstruct"):
            report.reconstruction = _reconstruct(ctx, outcome)
    exported = export(ctx, outcome, soft, folder)
    report.update(structure_sections(ctx, outcome, exported.model))
    report.update(selection_sections(ctx, outcome, soft))
    if cfg.has_teacher:
        report.distill = _distill_section(ctx, outcome)
    if ctx.val_windows is not None:  # held-out scores along the run: in the distill section for a distillation
        curve = validation_curve(folder / "metrics.jsonl", cfg.data)
        if cfg.has_teacher:
            report.distill["validation"] = curve
        else:
            report.validation = curve
    report.perplexity = {
        "protocol": "WikiText-2 raw test, non-overlapping windows, exp(mean NLL)",
        "dense": ppl_dense,
        "before_cut": ppl_before_cut,
        "after_cut": ppl_after_cut,
        "exported": ctx.ppl(exported.model, "exported") if evaluate_export else None,
    }
    zs_exported = ctx.zeroshot(exported.model, "exported") if evaluate_export else None
    report.zeroshot = {"dense": zs_dense, "exported": zs_exported} if ctx.tasks else None
    report.parity = exported.parity.to_dict()
    report.roundtrip = {**exported.roundtrip.to_dict(), "dtype": str(exported.dtype).replace("torch.", "")}
    report.seconds = {**ctx.phases.seconds, "total": round(time.perf_counter() - ctx.started, 3)}
    report.memory = ctx.phases.memory()
    report.shared = ctx.shared.summary()
    torch.save(soft, folder / "masks.pt")
    return report


def _reconstruct(ctx: RunContext, outcome: Outcome) -> dict:
    """The re-fit of the cut's kept o_proj / down_proj columns: to the dense model's outputs where the outcome
    holds it (``reconstruct_target`` dense), else to each projection's own uncut outputs."""
    cfg = ctx.cfg
    windows = ctx.windows[: cfg.resolved_cut_samples()]
    if outcome.reference is None:
        return reconstruct_layerwise_(
            outcome.model,
            ctx.adapter,
            ctx.structure.head,
            outcome.kept,
            windows,
            batch_size=cfg.batch_size,
            ridge=cfg.reconstruct_ridge,
            execution=ctx.passes,
        )
    dense, outcome.reference = outcome.reference, None  # consumed: its layers run in place, then it is freed
    shape = outcome.shape
    layers = len(ctx.adapter.layers(dense))
    return reconstruct_to_dense_(
        outcome.model,
        dense,
        ctx.adapter,
        ctx.structure.head,
        outcome.kept,
        windows,
        keep_layers=shape.keep_layers if shape is not None else list(range(layers)),
        keep_hidden=shape.keep_hidden if shape is not None else torch.arange(int(dense.config.hidden_size)),
        batch_size=cfg.batch_size,
        ridge=cfg.reconstruct_ridge,
    )


def choose_units(ctx: RunContext, ckpt_dir: Path) -> Outcome:
    """The learned method or a one-shot baseline; either way an fp32 model with masks, plan and kept units."""
    cfg, main = ctx.cfg, ctx.main
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    if cfg.method == "maskprune":
        return learn_and_plan(ctx, ckpt_dir)
    fp32 = weight_dtype(cfg) == torch.float32
    dense_target = bool(cfg.reconstruct) and cfg.reconstruct_target == "dense"
    reference = _dense_copy(ctx, ctx.loaded.model) if dense_target and fp32 else None  # before any cut
    shape = _reshape(ctx) if wants_shape_search(cfg.resolved_prune_axes()) else None
    args = (cfg, ctx.loaded.model, ctx.adapter, ctx.structure, ctx.windows, ctx.budget, ctx.device)
    sigma_head = shape.k_head / ctx.structure.head.units_per_row if shape is not None else None
    scores = shape.cut_scores() if shape is not None else None
    outcome = score_and_plan(*args, ctx.phases, sigma_head=sigma_head, execution=ctx.passes, scores=scores)
    if not fp32:  # fold and verify in fp32, as for the learned masks
        probe, kept_dense = _probe(ctx), []

        def reshape(m) -> None:  # the fresh fp32 model: keep it whole for the fit, then cut it to the shape
            if dense_target:
                kept_dense.append(_dense_copy(ctx, m))
            if shape is not None:
                apply_shape_(m, ctx.adapter, shape, probe, check=True)

        outcome.model, outcome.masks = rebuild_for_export(
            cfg, outcome.model, ctx.adapter, ctx.structure, outcome.masks, ctx.device, main, reshape=reshape
        )
        reference = kept_dense[0] if kept_dense else None
    outcome.shape, outcome.reference = shape, reference
    return outcome


def _dense_copy(ctx: RunContext, model):
    """A second, uncut copy of ``model`` (the re-fit's targets): where the weights wait on disk, the source read
    again the same way (nothing is copied in memory), else a deep copy."""
    if disk_weights(model) is None:
        return copy.deepcopy(model)
    dtype = next(model.parameters()).dtype
    return load_model(
        ctx.cfg.model, gguf_file=ctx.cfg.gguf_file, trust_remote_code=ctx.cfg.trust_remote_code,
        device=ctx.device, dtype=dtype, offload=True,
    ).model  # fmt: skip


def _probe(ctx: RunContext) -> torch.Tensor:
    return ctx.windows[:2, : min(ctx.cfg.seq_len, 64)]


def _reshape(ctx: RunContext):
    """The shape search, and the run's model cut to its choice (``ctx.structure`` now describes the cut model)."""
    shape = search_shape(ctx)
    fp32 = next(ctx.loaded.model.parameters()).dtype == torch.float32
    apply_shape_(ctx.loaded.model, ctx.adapter, shape, _probe(ctx), check=fp32)
    ctx.structure = Structure.of(ctx.loaded.model, ctx.adapter, ctx.cfg.gqa_policy)
    return shape


def _cut(ctx: RunContext, outcome: Outcome, ppl_dense: dict | None) -> tuple[dict | None, dict | None]:
    """Harden the masks to the kept units; the perplexity just before and just after. Evaluations that would
    repeat one already made are not run again: a one-shot baseline's model before the cut is the dense model
    (masks at 1), a frozen selection is already the cut (hard masks), and a distillation cuts nothing (its model is
    the one exported, evaluated then): none. Without ``eval_between`` only what is known already is reported."""
    if ctx.cfg.has_teacher or not ctx.cfg.resolved_eval_between():
        with ctx.phases("cut"):
            harden_(outcome.masks, outcome.kept)
        return (ppl_dense if outcome.state is None and not ctx.cfg.has_teacher else None), None
    ppl_before_cut = ppl_dense if outcome.state is None else ctx.ppl(outcome.model, "before_cut")
    with ctx.phases("cut"):
        harden_(outcome.masks, outcome.kept)
    frozen = outcome.state is not None and outcome.state.frozen_at is not None
    ppl_after_cut = ppl_before_cut if frozen else ctx.ppl(outcome.model, "after_cut")
    return ppl_before_cut, ppl_after_cut


def _distill_section(ctx: RunContext, outcome: Outcome) -> dict:
    cfg = ctx.cfg
    return {
        "teacher": cfg.teacher,
        "mode": "full" if cfg.full else f"lora rank {cfg.lora_rank}",
        "steps": outcome.state.step,
        "tokens": outcome.state.step * cfg.batch_size * cfg.seq_len,
        "seconds": ctx.phases.seconds.get("learn"),
        "calib": cfg.calib,
        # 0: the full vocabulary; k: the cached top-k and the tail (val_kl too)
        "teacher_topk": ctx.teacher_topk.k if ctx.teacher_topk is not None else 0,
        "teacher_topk_cache": str(ctx.teacher_topk.path) if ctx.teacher_topk is not None else None,
        "teacher_topk_windows": {  # windows read from the cache and computed by this run (teacher forwards), and the
            # mean share of the teacher's probability the top-k held on them
            name: {"read": top.read, "computed": top.computed, "mass": top.mass}
            for name, top in (("training", ctx.teacher_topk), ("held_out", ctx.val_teacher_topk))
            if top is not None
        },
        **_budget_section(ctx),
    }


def _budget_section(ctx: RunContext) -> dict:
    """Where a time budget set the steps: the budget, the most steps it could buy, the measured seconds a step."""
    if ctx.pacer is None:
        return {}
    return {
        "budget_minutes": ctx.clock.minutes,
        "steps_cap": ctx.pacer.cap,
        "seconds_per_step": ctx.pacer.seconds_per_step,
        "reserve_minutes": round(ctx.clock.reserve / 60, 3),
    }
