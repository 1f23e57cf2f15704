"""The recipes: what a run does, each a short sequence of stages (:mod:`maskprune.stages`).

- :func:`prune_recipe`: set up, choose the units (learned or one-shot), cut, export, evaluate, write.
- :func:`distill_recipe`: the same stages on a pruned student with a separate teacher and nothing to select
  (``maskprune distill``).
- :func:`prune_then_recover`: a prune into ``<out>.cut``, then a distillation of that export from the dense
  model into ``out`` (``maskprune prune --recover-steps N``); one report that tells both. The default recipe
  runs as this wherever its selection is fixed at step 0 (``cut_first``, :func:`cut_first_config`).

Every recipe writes its output folder under a staging name (renamed only when every step, the parity checks
included, passed), and writes the run's report once, with the model card, the figures and the GGUF beside it.
:func:`run` picks the recipe a configuration asks for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

from . import distributed as D
from .budget import TimeBudget, after_steps
from .checkpoint import checkpoint_dir, list_checkpoints
from .config import DISTILL_SETTINGS, PruneConfig, cut_first_config
from .errors import MaskPruneError
from .modelcard import write_model_card
from .offload import close_all
from .outputs import check_output_path, default_out, staging
from .report import make_report
from .runreport import RunReport
from .stages.context import setup
from .stages.run import run_stage

__all__ = [
    "run",
    "resumable",
    "check_request",
    "prune_recipe",
    "distill_recipe",
    "prune_then_recover",
    "distill_config",
    "cut_first_config",
]

log = logging.getLogger(__name__)


def run(cfg: PruneConfig, *, progress: bool = True) -> dict:
    """The recipe ``cfg`` asks for; return its report (also written as ``maskprune_report.json``).

    Under a launcher (``torchrun``, ``accelerate launch``) every process calls this; the process group it
    joins is destroyed before it returns or raises (a group the caller created is left alone)."""
    clock = TimeBudget(cfg.minutes) if cfg.minutes and cfg.distils_fixed_selection() else None
    if cfg.minutes and clock is None:
        log.warning("--minutes applies to a distillation of a fixed selection: this run's %d --steps stand", cfg.steps)
    try:
        if cfg.gguf:  # the converter (and the quantizer) are checked before any work, not after it
            from .gguf_export import preflight

            preflight(cfg.gguf)
        cfg = planned(cfg)
        if cfg.has_teacher:
            return distill_recipe(cfg, progress=progress, clock=clock)
        if cfg.resolved_cut_first():
            first = cut_first_config(cfg)
            if not first.recover_steps:  # --steps 0: the prior's cut (re-fit, shaped) is the whole run
                return prune_recipe(first, progress=progress)
            return prune_then_recover(first, progress=progress, cut_first=True, clock=clock)
        if cfg.recover_steps:
            return prune_then_recover(cfg, progress=progress)
        return prune_recipe(cfg, progress=progress)
    finally:
        close_all()  # weights that waited on disk: their scratch folders go with the run
        D.shutdown()


def check_request(cfg: PruneConfig) -> None:
    """The checks of ``cfg`` that need the model's config only (nothing loaded): the options, and what the run asks
    of the model's shape (a fixed width or depth it has; a shape that meets the budget). ``maskprune sweep`` makes
    them for every size before the first runs."""
    from .stages.plan import check_request as check_shape
    from .stages.plan import model_facts

    cfg.validate()
    check_shape(cfg, model_facts(cfg.model, gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code))


def planned(cfg: PruneConfig) -> PruneConfig:
    """``cfg`` checked against its plan before any heavy work (:mod:`maskprune.plan`): what it asks of the model's
    shape, and whether its largest phase fits in ``max_memory`` (refused with advice where not); ``streaming auto``
    settled by the plan. A distillation and a run of several processes are not planned yet (logged)."""
    from .stages.plan import check_plan, check_request, model_facts, plan_for

    if cfg.has_teacher or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        log.info("no plan: distillation and runs of several processes are not planned yet")
        return cfg
    cfg.validate()
    facts = model_facts(cfg.model, gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code)
    check_request(cfg, facts)
    plan = plan_for(cfg, facts)
    peak = plan.peak
    log.info(
        "plan: largest phase %s, about %.1f GiB of %.1f GiB allowed; about %.0f minutes at %.0f GFLOP/s (streaming %s)",
        peak.name, peak.peak_bytes / 2**30, plan.max_memory / 2**30, plan.seconds / 60, plan.rate_flops / 1e9,
        "on" if plan.streamed else "off",
    )  # fmt: skip
    if not plan.fits:  # windows longer than the model's context: that is the error to report, not their memory
        from .stages.context import check_context

        check_context(cfg.data, cfg.evaluation, getattr(facts.config, "max_position_embeddings", None))
    check_plan(plan)
    return cfg.replace(streaming="on" if plan.streamed else "off") if cfg.streaming == "auto" else cfg


def prune_recipe(cfg: PruneConfig, *, progress: bool = True, clock: TimeBudget | None = None) -> dict:
    """Set up; choose the units, cut, export and evaluate into a staging folder; write the outputs; publish.
    ``clock``: a time budget that sets a distillation's steps (:mod:`maskprune.budget`)."""
    ctx = setup(cfg, progress)
    ctx.clock = clock
    try:
        with staging(ctx.out, ctx.cfg.overwrite) if ctx.main else contextlib.nullcontext(None) as folder:
            report = run_stage(ctx, folder)
            if not ctx.main:
                return report
            _write_outputs(folder, report, figures=ctx.cfg.report)
    except BaseException:
        _remove_if_empty(checkpoint_dir(ctx.out))  # a run refused before its first checkpoint leaves nothing
        raise
    shutil.rmtree(checkpoint_dir(ctx.out), ignore_errors=True)  # the run is complete; its checkpoints are spent
    return _published(report, ctx.out)


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()  # only an empty folder goes


def distill_recipe(cfg: PruneConfig, *, progress: bool = True, clock: TimeBudget | None = None) -> dict:
    """``maskprune distill``: the prune recipe's stages on the student, with the teacher and no selection."""
    return prune_recipe(distill_config(cfg), progress=progress, clock=clock)


def distill_config(cfg: PruneConfig) -> PruneConfig:
    """``cfg`` with what distillation fixes: no mask learning, the structure kept (see DISTILL_SETTINGS)."""
    if cfg.teacher is None:
        raise MaskPruneError(
            "distill needs a teacher", fix="pass --teacher DENSE (the model the student was pruned from)"
        )
    return cfg.replace(**DISTILL_SETTINGS).validate()


def prune_then_recover(
    cfg: PruneConfig, *, progress: bool = True, cut_first: bool = False, clock: TimeBudget | None = None
) -> dict:
    """``maskprune prune --recover-steps N``: prune into ``<out>.cut``, distil that export from the dense model
    for N steps into ``out``; one report and model card that tell both phases. ``<out>.cut`` is removed once
    ``out`` is complete; with ``--resume`` a finished cut of the same run is reused. ``cut_first``: the default
    recipe runs as this (:func:`cut_first_config`); the report says so. ``clock``: a time budget that sets the
    recovery's steps; what the run needs after them is measured on the cut (its export and evaluations)."""
    cfg.validate()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MaskPruneError(
            "--recover-steps runs in one process",
            found=f"a launcher with WORLD_SIZE={os.environ['WORLD_SIZE']}",
            fix="under torchrun / accelerate, run `maskprune prune` and then `maskprune distill` (both data-parallel)",
        )
    out = Path(cfg.out) if cfg.out else default_out(cfg.source, cfg.cut)
    check_output_path(out, cfg.overwrite)
    cut_dir = out.with_name(out.name + ".cut")
    cut_cfg, rec_cfg = _recovery_configs(cfg, out, cut_dir)
    cut = _finished_cut(cut_dir, cut_cfg) if cfg.resume else None
    if cut is None and cfg.resume and cut_cfg.method != "maskprune":  # a one-shot cut keeps no checkpoints
        raise MaskPruneError(
            "--resume: nothing to resume",
            found=f"'{cut_dir}' holds no finished cut of this run, so '{checkpoint_dir(out)}' holds no checkpoint "
            "of its recovery (the one-shot cut itself is not checkpointed)",
            fix="run the same command without --resume to start over",
        )
    if cut is None:  # its export is evaluated where the budget needs that measure, or eval_between asks it
        cut = _cut_stage(cut_cfg, cut_dir, progress, intermediate=clock is None)
    if cfg.resume and not list_checkpoints(checkpoint_dir(out)):  # the cut finished, the recovery had no checkpoint
        rec_cfg = rec_cfg.replace(resume=False)
    rec = setup(rec_cfg, progress)
    if clock is not None:
        clock.reserve = after_steps(cut.seconds)
        rec.clock = clock
    known = (cut.perplexity["exported"], (cut.zeroshot or {}).get("exported"))
    with staging(out, cfg.overwrite) as folder:
        report = _merge(cfg, cut, run_stage(rec, folder, student_eval=known))
        report.recovery["cut_first"] = cut_first
        (folder / "metrics.jsonl").rename(folder / "recovery_metrics.jsonl")
        for name in ("masks.pt", "metrics.jsonl"):  # the cut's: the learning run's masks and metrics
            if (cut_dir / name).exists():
                shutil.copy2(cut_dir / name, folder / name)
        _write_outputs(folder, report, figures=cfg.report)
    shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
    shutil.rmtree(cut_dir, ignore_errors=True)
    return _published(report, out)


def resumable(out: Path) -> bool:
    """Whether a run into ``out`` that was cut off left work ``--resume`` continues: a finished cut of prune +
    recovery (``<out>.cut``), or checkpoints (``<out>.checkpoints``)."""
    out = Path(out)
    cut_dir = out.with_name(out.name + ".cut")
    return (cut_dir / _STAGE_RECORD).is_file() or bool(list_checkpoints(checkpoint_dir(out)))


_STAGE_RECORD = "cut_stage.json"
"""The cut's report inside ``<out>.cut``: what ``--resume`` checks and reuses when the recovery was interrupted."""
_CUT_KEYS = (
    "model",
    "gguf_file",
    "sparsity",
    "budget_params",
    "method",
    "steps",
    "seed",
    "calib",
    "calib_samples",
    "cut_samples",
    "prune_axes",
    "reconstruct",
    "reconstruct_target",
)


def _recovery_configs(cfg: PruneConfig, out: Path, cut_dir: Path) -> tuple[PruneConfig, PruneConfig]:
    """The cut's config and the recovery's (settled and checked before the cut, so a bad setting costs no cut)."""
    cut_cfg = cfg.replace(
        recover_steps=0, full=False, teacher_topk=0, out=str(cut_dir), overwrite=True, gguf=None, report=False
    )
    rec_cfg = distill_config(
        cfg.replace(
            model=str(cut_dir),
            gguf_file=None,
            teacher=cfg.model,
            teacher_gguf_file=cfg.gguf_file,
            steps=cfg.recover_steps,
            recover_steps=0,
            reconstruct=False,  # the cut was re-fit (or not) and shaped by the cut stage; the recovery keeps it
            prune_axes=("heads", "ffn"),
            keep_hidden=None,
            keep_layers=None,
            out=str(out),
            report=False,
        )
    )
    return cut_cfg, rec_cfg


def _cut_stage(cut_cfg: PruneConfig, cut_dir: Path, progress: bool, *, intermediate: bool) -> RunReport:
    """The prune of prune + recovery, published as ``<out>.cut`` (the recovery's student) with its record;
    ``intermediate``: its export evaluated only where ``eval_between`` asks (:func:`run_stage`)."""
    ctx = setup(cut_cfg, progress)
    with staging(cut_dir, overwrite=True) as folder:
        cut = run_stage(ctx, folder, intermediate=intermediate)
        (folder / _STAGE_RECORD).write_text(json.dumps(cut.to_dict(), indent=1))
    shutil.rmtree(checkpoint_dir(cut_dir), ignore_errors=True)
    return cut


def _finished_cut(cut_dir: Path, cut_cfg: PruneConfig) -> RunReport | None:
    """The report of a finished cut of the same run in ``cut_dir`` (reused by --resume), else None."""
    path = cut_dir / _STAGE_RECORD
    if not path.is_file():
        return None
    report = RunReport.from_dict(json.loads(path.read_text()))
    if any(getattr(report.config, k) != getattr(cut_cfg, k) for k in _CUT_KEYS):
        return None
    return report


def _merge(cfg: PruneConfig, cut: RunReport, rec: RunReport) -> RunReport:
    """One report for prune + recovery (``cfg``): the cut's (model, structure, selection, dense figures) with the
    recovery's training, evaluation of the final model, parity and timings."""
    report = dataclasses.replace(cut)
    report.config = cut.config.replace(  # the cut's settled config (dtype resolved) with what the user asked
        recover_steps=rec.distill["steps"],
        full=rec.config.full,
        out=rec.config.out,
        overwrite=cfg.overwrite,
        gguf=cfg.gguf,
        report=cfg.report,
    )
    report.recovery = {**rec.distill, "teacher": cut.config.model}
    if rec.distill.get("budget_minutes"):  # the whole run against its time budget
        report.recovery["run_minutes"] = round((cut.seconds["total"] + rec.seconds["total"]) / 60, 3)
    report.perplexity = {**cut.perplexity, "before_recovery": cut.perplexity["exported"]}
    report.perplexity["exported"] = rec.perplexity["exported"]
    if cut.zeroshot or rec.zeroshot:
        zs = dict(cut.zeroshot or {})
        zs["before_recovery"], zs["exported"] = zs.get("exported"), (rec.zeroshot or {}).get("exported")
        report.zeroshot = zs
    report.parity, report.roundtrip = rec.parity, rec.roundtrip
    report.seconds = {
        "prune": cut.seconds,
        "recovery": rec.seconds,
        "total": round(cut.seconds["total"] + rec.seconds["total"], 3),
    }
    report.memory = {"prune": cut.memory, "recovery": rec.memory}
    return report


def _write_outputs(folder: Path, report: RunReport, *, figures: bool) -> None:
    """Everything a finished run writes beside the checkpoint, the report once: the GGUF (recorded in the
    report), ``maskprune_report.json``, the model card and, for a learning run, the figures."""
    cfg = report.config
    if cfg.gguf:
        from .gguf_export import export_gguf

        path = export_gguf(folder, gguf_type=cfg.gguf)
        report.gguf = {"file": path.name, "type": cfg.gguf.lower(), "bytes": path.stat().st_size}
        log.info("wrote %s (%.1f MB)", path.name, report.gguf["bytes"] / 1e6)
    report.write(folder)
    write_model_card(folder, report)
    if figures:
        make_report(folder)


def _published(report: RunReport, out: Path) -> dict:
    """The report of a published run as the caller gets it (with ``out``), after a line that says what it is."""
    shape, params = report.shape, report.params
    log.info(
        "wrote %s: %d -> %d parameters (%.1f%% removed), %d heads / %d KV / FFN %d per layer",
        out,
        params["dense"],
        params["exported"],
        100 * params["sparsity"],
        shape["num_attention_heads"],
        shape["num_key_value_heads"],
        shape["intermediate_size"],
    )
    report.out = str(out)
    return report.to_dict()
