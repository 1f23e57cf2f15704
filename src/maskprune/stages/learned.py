"""The learned method's run: the one-shot prior, the split search, the learner with its metrics,
checkpoints, signals and exact resume, then the cut plan from the learned state."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .. import distributed as D
from ..arch import DecoderAdapter, adapter_for
from ..baselines import unit_scores
from ..budget import Pacer, after_steps
from ..checkpoint import config_fingerprint, load_latest, save_checkpoint
from ..config import DataConfig, PruneConfig
from ..cut import plan_cut, select_units
from ..data import calibration_windows
from ..errors import MaskPruneError
from ..learner import Learner, LearnState, attach_lora
from ..mask_optim import prior_masks
from ..masks import MaskSet
from ..outputs import Phases
from ..sinks import ExtraSinks
from ..split import SplitResult
from ..structure import Structure
from .context import RunContext, load_source
from .outcome import Outcome, measure_split, rebuild_for_export, score_summary, weight_dtype

__all__ = ["LearnerBuild", "build_learner", "learn_and_plan", "validation_curve"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LearnerBuild:
    """A learner ready to step, and what it was built from (the model with LoRA and masks attached)."""

    learner: Learner
    model: torch.nn.Module
    masks: MaskSet
    adapter: DecoderAdapter
    structure: Structure
    windows: torch.Tensor
    budget: int
    split: SplitResult | None
    prior: tuple[torch.Tensor, torch.Tensor] | None = None  # the one-shot scores the masks started from
    tokenizer: object | None = None  # when the model was loaded here


def build_learner(
    cfg: PruneConfig,
    *,
    model: torch.nn.Module | None = None,
    adapter: DecoderAdapter | None = None,
    structure: Structure | None = None,
    windows: torch.Tensor | None = None,
    budget: int | None = None,
    device: torch.device | None = None,
    phases: Phases | None = None,
    on_step=None,
    teacher: torch.nn.Module | None = None,
    val_windows: torch.Tensor | None = None,
    teacher_topk=None,
    val_teacher_topk=None,
) -> LearnerBuild:
    """The one way to build a learner from a config: load -> adapter -> structure -> prior -> LoRA -> masks ->
    split -> learner. What is given is used as it is (a run passes what its setup built); what is not is made
    from ``cfg`` (a benchmark passes ``cfg`` alone: the model in the weight dtype, ``calib_samples`` windows)."""
    device = device or torch.device("cpu")
    tokenizer = None
    if model is None:
        loaded, adapter = load_source(cfg, device)
        model, tokenizer = loaded.model, loaded.tokenizer
    adapter = adapter or adapter_for(model)
    structure = structure or Structure.of(model, adapter, cfg.gqa_policy)
    budget = cfg.budget_for(structure.dense_params) if budget is None else budget
    if windows is None:
        d = cfg.data
        windows = calibration_windows(
            d.calib, tokenizer, seq_len=d.seq_len, num_windows=d.calib_samples, config=d.calib_config
        )
    model, masks, split, prior = _prepare(cfg, model, adapter, structure, windows, budget, device, phases or Phases())
    learner = Learner(
        model, masks, windows, cfg, budget, on_step=on_step, teacher=teacher, val_windows=val_windows,
        teacher_topk=teacher_topk, val_teacher_topk=val_teacher_topk,
    )  # fmt: skip
    if split is not None:  # the run starts from the measured split (the freeze plans this head count)
        learner.state.sigma["head"] = split.best.k_head / structure.head.units_per_row
    return LearnerBuild(learner, model, masks, adapter, structure, windows, budget, split, prior, tokenizer)


def learn_and_plan(ctx: RunContext, ckpt_dir: Path) -> Outcome:
    """MaskPrune: the prior, LoRA, the masks and the measured split, then the learning loop with its metrics
    and checkpoints (the metrics file and the trackers closed whatever happens); the cut plan from the learned
    state."""
    cfg, main = ctx.cfg, ctx.main
    metrics_path = ckpt_dir / "metrics.jsonl"
    metrics_file = open(metrics_path if main else os.devnull, "a", encoding="utf-8")
    trackers = ExtraSinks(cfg.trackers if main else (), str(ckpt_dir / "tensorboard"), cfg.to_dict())
    bar = tqdm(
        total=cfg.steps,
        desc="learn masks" if cfg.selection_steps() > 0 and not cfg.has_teacher else "distill",
        disable=not (ctx.progress and main),
        dynamic_ncols=True,
    )
    try:
        build = build_learner(
            cfg,
            model=ctx.loaded.model,
            adapter=ctx.adapter,
            structure=ctx.structure,
            windows=ctx.windows,
            budget=ctx.budget,
            device=ctx.device,
            phases=ctx.phases,
            on_step=_on_step(cfg, ctx.budget, bar, metrics_file, trackers),
            teacher=ctx.teacher,
            val_windows=ctx.val_windows,
            teacher_topk=ctx.teacher_topk,
            val_teacher_topk=ctx.val_teacher_topk,
        )
        split = _split_record(build.split, ckpt_dir / "split_search.json", main, cfg.resume)
        if cfg.resume:
            _resume(build.learner, ckpt_dir, cfg, metrics_path if main else None, metrics_file)
            bar.update(build.learner.state.step)
        state = _learn(build.learner, ctx, ckpt_dir, metrics_file, bar)
    finally:
        bar.close()
        metrics_file.close()
        trackers.close()
    return _plan(ctx, build, state, split)


def _split_record(split: SplitResult | None, path: Path, main: bool, resume: bool) -> dict | None:
    """The split search for the report: measured now (and kept beside the checkpoints for a resume), or, on
    a resume, the interrupted run's (the checkpoint holds the masks, so the search does not run again)."""
    if split is not None:
        if main:
            path.write_text(json.dumps(split.to_dict(), indent=1))
        return split.to_dict()
    if resume and main and path.exists():
        return json.loads(path.read_text())
    return None


def _learn(learner: Learner, ctx: RunContext, ckpt_dir: Path, metrics_file, bar) -> LearnState:
    """The learning loop with a checkpoint every ``checkpoint_every`` steps and on SIGINT / SIGTERM."""
    cfg, main = ctx.cfg, ctx.main

    def write_checkpoint(lrn: Learner) -> None:
        state_dict = lrn.state_dict()  # every process: a collective when FSDP shards LoRA
        if not main:
            return
        metrics_file.flush()
        os.fsync(metrics_file.fileno())
        payload = {**state_dict, "config": config_fingerprint(cfg.to_dict()), "budget": ctx.budget}
        path = save_checkpoint(ckpt_dir, payload, lrn.state.step, cfg.keep_checkpoints)
        log.info("checkpoint %s", path)

    pacer = _pacer(learner, ctx, bar)
    with ctx.phases("learn"), _stop_on_signals() as stop, logging_redirect_tqdm():  # log lines above the bar
        state = learner.run(
            checkpoint=write_checkpoint,
            every=cfg.checkpoint_every,
            should_stop=lambda: stop["requested"],
            retarget=None if pacer is None else _following(pacer, bar),
        )
    ctx.pacer = pacer
    return state


def _pacer(learner: Learner, ctx: RunContext, bar) -> Pacer | None:
    """Where a time budget runs (``ctx.clock``) over a distillation, the pacer that sets its step count (at most
    ``steps``) from the steps' measured pace; None otherwise. A budget spent before the first step leaves none."""
    if ctx.clock is None or not ctx.cfg.has_teacher:
        return None
    if not ctx.clock.reserve:  # a distillation alone: its student's evaluation, measured at the start
        ctx.clock.reserve = after_steps(ctx.phases.seconds)
    pacer = Pacer(ctx.clock, ctx.cfg.steps)
    first = pacer.start()
    if first < learner.cfg.steps:
        log.warning(
            "time budget: %.1f of %.1f minutes spent before the distillation (%.1f kept for the export and the "
            "evaluations): no steps; give more --minutes, or --steps N",
            ctx.clock.elapsed_minutes(), ctx.clock.minutes, ctx.clock.reserve / 60,
        )  # fmt: skip
        learner.cfg = learner.cfg.replace(steps=first)
        bar.total = first
    return pacer


def _following(pacer: Pacer, bar):
    """The learner's ``retarget``: the pacer's step count, the progress bar's total following it."""

    said = []

    def retarget(done: int) -> int | None:
        steps = pacer(done)
        if steps is not None and not said:
            said.append(steps)
            log.info(
                "time budget: %.2f s a step, %d steps fit the %.1f minutes left (%.1f kept for the export and the "
                "evaluations)",
                pacer.seconds_per_step, steps, (pacer.budget.left() + pacer.budget.reserve) / 60,
                pacer.budget.reserve / 60,
            )  # fmt: skip
        if steps is not None and steps != bar.total:
            bar.total = steps
            bar.refresh()
        return steps

    return retarget


def _plan(ctx: RunContext, build: LearnerBuild, state: LearnState, split: dict | None) -> Outcome:
    """The learned masks made deterministic, the model rebuilt in fp32 where learning was not, the cut planned
    from the state."""
    cfg, model, masks = ctx.cfg, build.model, build.masks
    masks.materialize_()  # L0 / polarization parameters -> their deterministic mask values
    if (cfg.fsdp and D.world() > 1) or weight_dtype(cfg) != torch.float32:
        model, masks = rebuild_for_export(cfg, model, ctx.adapter, ctx.structure, masks, ctx.device, ctx.main)
    plan = plan_cut(
        ctx.structure,
        sigma_head=state.sigma["head"],
        budget=ctx.budget,
        head_multiple=cfg.head_multiple,
        ffn_multiple=cfg.ffn_multiple,
    )
    kept = select_units(masks.head, masks.ffn, plan)
    scores = score_summary(cfg.mask_init, build.prior, kept) if build.prior is not None else None
    return Outcome(model, masks, state, plan, kept, split=split, scores=scores)


def _prepare(cfg: PruneConfig, model, adapter, structure: Structure, windows, budget: int, device, phases):
    """The one-shot prior (not on resume: the checkpoint has the masks), LoRA, gradient checkpointing, FSDP,
    the masks set from the prior, and the measured split. Returns ``(model, masks, split or None, prior or
    None)``."""
    prior = None
    if cfg.mask_init != "ones" and not cfg.resume:
        with phases("prior"):
            prior = unit_scores(
                cfg.mask_init, model, adapter, structure, windows[: cfg.prior_samples], batch_size=cfg.batch_size
            )
    if cfg.full:
        model.requires_grad_(True)
    elif cfg.lora:
        model = attach_lora(model, adapter, cfg.lora_targets, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if cfg.fsdp and D.world() > 1:
        D.shard_fsdp(model, adapter.layers(model))
    masks = MaskSet(structure, cfg.mask_type).to(device).attach(model)
    split: SplitResult | None = None
    if prior is not None:
        for kind, scores in zip(("head", "ffn"), prior):
            masks.set_values_(kind, prior_masks(scores, cfg.mask_init_spread))
        if cfg.resolved_split_search():
            with phases("split"):
                split = measure_split(cfg, model, masks, structure, prior, windows, budget, device)
    return model, masks, split, prior


def _on_step(cfg: PruneConfig, budget: int, bar, metrics_file, trackers):
    """The learner's per-step callback: metrics to the JSONL file and trackers, the progress bar, and an
    early estimate of the time left."""
    clock = [time.perf_counter(), 0]  # start of the timed steps, steps seen
    val: dict[str, str] = {}  # the latest held-out perplexity, shown until the next

    def on_step(m: dict) -> None:
        metrics_file.write(json.dumps(m) + "\n")
        trackers.write(m)
        clock[1] += 1
        if cfg.compile and clock[1] == 3:  # the first steps compiled; time the next three
            clock[0] = time.perf_counter()
        if clock[1] == (6 if cfg.compile else 3) and not cfg.minutes:  # say up front how long this will take
            per_step = (time.perf_counter() - clock[0]) / 3
            log.info(
                "mask learning: %.1f s/step, about %.0f min left for %d steps (then cut, export, eval)",
                per_step,
                per_step * (cfg.steps - m["step"] - 1) / 60,
                cfg.steps,
            )
        bar.update(1)
        if "val_ppl" in m:
            val["val_ppl"] = f"{m['val_ppl']:.4g}"
            log.info("validation after %d steps: %s", m["step"] + 1, _val_text(m))
        if m["step"] % cfg.log_every == 0 or "val_ppl" in m:
            bar.set_postfix(**_postfix(m, budget), **val)

    return on_step


def _postfix(m: dict, budget: int) -> dict[str, str]:
    """The progress bar's figures: the loss (4 significant digits: a KL of 3e-4 shows as such) and, while the
    masks learn, the sparsity fractions, the multipliers and the size at the cut against the budget."""
    shown = {"loss": f"{m['loss']:.4g}"}
    if not m["frozen"]:
        shown.update(
            s_head=f"{m['sigma_head']:.2f}",
            s_ffn=f"{m['sigma_ffn']:.2f}",
            y=f"{m['y']:.2g}",
            z=f"{m['z']:.2g}",
            size=f"{m['size_at_cut'] / 1e6:.1f}M/{budget / 1e6:.1f}M",
        )
    return shown


def _val_text(m: dict) -> str:
    kl = f"KL to the teacher {m['val_kl']:.4f}, " if "val_kl" in m else ""
    return f"{kl}perplexity {m['val_ppl']:.4g} on the held-out windows"


def validation_curve(metrics_path: Path, data: DataConfig) -> list[dict]:
    """The held-out scores of a run from its metrics file: one entry per validation, with the steps and
    tokens trained by then (the report's ``validation``)."""
    curve = []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        m = json.loads(line) if line.strip() else {}
        if "val_ppl" in m:
            steps = m["step"] + 1
            entry = {"steps": steps, "tokens": steps * data.batch_size * data.seq_len, "ppl": m["val_ppl"]}
            if "val_kl" in m:
                entry["kl"] = m["val_kl"]
            curve.append(entry)
    return curve


def _resume(learner: Learner, ckpt_dir: Path, cfg: PruneConfig, metrics_path: Path | None, metrics_file) -> None:
    loaded = load_latest(ckpt_dir)
    if loaded is None:
        raise MaskPruneError(
            f"--resume: every checkpoint in {str(ckpt_dir)!r} is unreadable", fix="pass --overwrite to start over"
        )
    payload, path = loaded
    mine, theirs = config_fingerprint(cfg.to_dict()), payload.get("config", {})
    # a key the checkpoint does not know was added to maskprune since; it matches if left at its default
    defaults = config_fingerprint(PruneConfig().to_dict())
    theirs = {**{k: defaults[k] for k in mine if k not in theirs and k in defaults}, **theirs}
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
        raise MaskPruneError(
            "--resume: the configuration differs from the interrupted run's",
            found=", ".join(f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in diff),
            fix="resume with the same settings, or --overwrite to start over",
        )
    learner.load_state_dict(payload)
    step = learner.state.step
    if metrics_path is None:
        return
    # keep the metrics of the steps the checkpoint covers, drop any written after it
    metrics_file.flush()
    lines = metrics_path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] < step]
    metrics_file.seek(0)
    metrics_file.truncate()
    metrics_file.writelines(kept)
    log.info("resumed from %s at step %d", path.name, step)


@contextmanager
def _stop_on_signals() -> Iterator[dict]:
    """SIGINT / SIGTERM ask the learner to checkpoint and stop after the current step."""
    flag = {"requested": False}

    def handler(signum, _frame) -> None:
        if flag["requested"]:  # a second signal: stop now
            raise KeyboardInterrupt
        flag["requested"] = True
        log.warning("signal %d: writing a checkpoint after this step, then stopping", signum)

    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
