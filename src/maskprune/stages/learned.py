"""The learned method's run: the one-shot prior, the split search, the learner with its metrics,
checkpoints, signals and exact resume, then the cut plan from the learned state."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from .. import distributed as D
from ..baselines import unit_scores
from ..checkpoint import config_fingerprint, list_checkpoints, load_latest, save_checkpoint
from ..config import DataConfig, PruneConfig
from ..cut import plan_cut, select_units
from ..errors import MaskPruneError
from ..learner import Learner, attach_lora
from ..mask_optim import prior_masks
from ..masks import MaskSet
from ..outputs import Phases
from ..sinks import ExtraSinks
from ..split import SplitResult
from ..structure import Structure
from .outcome import Outcome, measure_split, rebuild_for_export, weight_dtype

__all__ = ["learn_and_plan", "checkpoint_dir", "check_checkpoints", "validation_curve"]

log = logging.getLogger(__name__)


def learn_and_plan(
    cfg: PruneConfig,
    model,
    adapter,
    structure: Structure,
    windows: torch.Tensor,
    budget: int,
    device: torch.device,
    main: bool,
    progress: bool,
    phases: "Phases",
    ckpt_dir: Path,
    metrics_path: Path,
    teacher=None,
    val_windows: torch.Tensor | None = None,
) -> Outcome:
    """MaskPrune: the prior, LoRA, the masks and the measured split, then the learning loop with its
    metrics and checkpoints; the cut plan from the learned state. Long because the metrics file, the trackers
    and the checkpoint callback share one try/finally that must close them whatever happens."""
    metrics_file = open(metrics_path if main else os.devnull, "a", encoding="utf-8")
    trackers = ExtraSinks(cfg.trackers if main else (), str(ckpt_dir / "tensorboard"), cfg.to_dict())
    split_path = ckpt_dir / "split_search.json"
    try:
        model, masks, split = _prepare(cfg, model, adapter, structure, windows, budget, device, phases)
        if split is not None and main:
            split_path.write_text(json.dumps(split.to_dict(), indent=1))
        desc = "distill" if cfg.distilling else "learn masks"
        bar = tqdm(total=cfg.steps, desc=desc, disable=not (progress and main), dynamic_ncols=True)
        learner = Learner(
            model,
            masks,
            windows,
            cfg,
            budget,
            on_step=_on_step(cfg, budget, bar, metrics_file, trackers),
            teacher=teacher,
            val_windows=val_windows,
        )
        if split is not None:  # the run starts from the measured split (the freeze plans this head count)
            learner.state.sigma["head"] = split.best.k_head / structure.head.units_per_row
        if cfg.resume:
            _resume(learner, ckpt_dir, cfg, metrics_path if main else None, metrics_file)
            bar.update(learner.state.step)

        def write_checkpoint(lrn: Learner) -> None:
            state_dict = lrn.state_dict()  # every process: a collective when FSDP shards LoRA
            if not main:
                return
            metrics_file.flush()
            os.fsync(metrics_file.fileno())
            payload = {**state_dict, "config": config_fingerprint(cfg.to_dict()), "budget": budget}
            path = save_checkpoint(ckpt_dir, payload, lrn.state.step, cfg.keep_checkpoints)
            log.info("checkpoint %s", path)

        with phases("learn"), _stop_on_signals() as stop:
            state = learner.run(
                checkpoint=write_checkpoint, every=cfg.checkpoint_every, should_stop=lambda: stop["requested"]
            )
        bar.close()
    finally:
        metrics_file.close()
        trackers.close()
    masks.materialize_()  # L0 / polarization parameters -> their deterministic mask values
    if (cfg.fsdp and D.world() > 1) or weight_dtype(cfg) != torch.float32:
        model, masks = rebuild_for_export(cfg, model, adapter, structure, masks, device, main)
    plan = plan_cut(
        structure,
        sigma_head=state.sigma["head"],
        budget=budget,
        head_multiple=cfg.head_multiple,
        ffn_multiple=cfg.ffn_multiple,
    )
    split_dict = json.loads(split_path.read_text()) if main and split_path.exists() else None
    return Outcome(model, masks, state, plan, select_units(masks.head, masks.ffn, plan), split=split_dict)


def _prepare(cfg: PruneConfig, model, adapter, structure: Structure, windows, budget: int, device, phases):
    """The one-shot prior (not on resume: the checkpoint has the masks), LoRA, gradient checkpointing, FSDP,
    the masks set from the prior, and the measured split. Returns ``(model, masks, split or None)``."""
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
    return model, masks, split


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
        if clock[1] == (6 if cfg.compile else 3):  # say up front how long this will take
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
            bar.set_postfix(
                loss=f"{m['loss']:.3f}",
                s_head=f"{m['sigma_head']:.2f}",
                s_ffn=f"{m['sigma_ffn']:.2f}",
                y=f"{m['y']:.2g}",
                z=f"{m['z']:.2g}",
                size=f"{m['size_at_cut'] / 1e6:.1f}M/{budget / 1e6:.1f}M",
                **val,
            )

    return on_step


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


def checkpoint_dir(out: Path) -> Path:
    """Where a run keeps its checkpoints and metrics until it completes: ``<out>.checkpoints``."""
    return out.with_name(out.name + ".checkpoints")


def check_checkpoints(out: Path, cfg: PruneConfig) -> None:
    """Refuse to silently mix runs: resume needs a checkpoint, a fresh run needs none (or --overwrite)."""
    ckpt_dir = checkpoint_dir(out)
    found = list_checkpoints(ckpt_dir)
    if cfg.resume and not found:
        raise MaskPruneError(
            f"--resume: no checkpoint in {str(ckpt_dir)!r}",
            fix="run without --resume to start, or pass the same --out as the interrupted run",
        )
    if not cfg.resume and ckpt_dir.exists():
        if not cfg.overwrite:
            raise MaskPruneError(
                f"an earlier, unfinished run left checkpoints in {str(ckpt_dir)!r}",
                fix="pass --resume to continue it, or --overwrite to start over",
            )
        shutil.rmtree(ckpt_dir)


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
