"""The run context: what every stage of one run shares once the run is set up (settled config, device, model,
structure, budget, data), and :func:`setup`, which builds it with every check before the first heavy work."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from .. import distributed as D
from ..arch import DecoderAdapter, adapter_for
from ..checkpoint import check_checkpoints
from ..config import DataConfig, EvalConfig, PruneConfig
from ..data import calibration_windows, wikitext2_test_text
from ..dtypes import autocast_dtype, resolve_dtype
from ..errors import MaskPruneError
from ..evaluate import perplexity, tokenize_windows
from ..models import LoadedModel, load_model
from ..outputs import Phases, check_output_path, default_out, resolve_device
from ..passes import Execution
from ..shared import SharedWork
from ..sinks import ExtraSinks
from ..structure import Structure
from ..zeroshot import check_sources, resolve_tasks, run_zeroshot
from .outcome import on_disk, weight_dtype
from .teacher import load_teacher, teacher_topk_caches

__all__ = ["RunContext", "setup", "load_source"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunContext:
    """What the stages of one run share once the run is set up: settled config, devices, model and data."""

    cfg: PruneConfig
    out: Path
    device: torch.device
    main: bool
    tasks: list[str]
    phases: Phases
    loaded: LoadedModel
    adapter: DecoderAdapter
    structure: Structure
    budget: int
    windows: torch.Tensor
    eval_windows: torch.Tensor | None
    bos: str
    progress: bool
    teacher: torch.nn.Module | None = None  # distill: the dense teacher (frozen, no gradient)
    val_windows: torch.Tensor | None = None  # held-out calibration windows (--val-every)
    started: float = dataclasses.field(default_factory=time.perf_counter)  # when setup began
    execution: Execution | None = None  # where the cut's passes over the model run (maskprune.passes)
    teacher_topk: object = None  # distill with --teacher-topk: the teacher's top-k on the training windows
    val_teacher_topk: object = None  # ... and on the held-out windows
    clock: object = None  # a time budget (maskprune.budget.TimeBudget) that sets the distillation's steps
    pacer: object = None  # the budget's pacer, once the distillation ran under it (maskprune.budget.Pacer)
    shared: SharedWork = dataclasses.field(default_factory=lambda: SharedWork(None, ""))  # --shared-cache

    @property
    def passes(self) -> Execution:
        """Where the cut's passes run: the run's execution, or resident on the run's device."""
        return self.execution or Execution(self.device)

    def ppl(self, m: torch.nn.Module, desc: str) -> dict | None:
        """WikiText-2 perplexity of ``m`` (rank 0; None without eval data)."""
        if self.eval_windows is None or not self.main:
            return None
        ev = self.cfg.evaluation
        with self.phases(f"eval_{desc}"):
            return perplexity(
                m,
                self.eval_windows,
                execution=self.passes,
                batch_size=self.cfg.data.batch_size,
                max_windows=ev.eval_max_windows,
                autocast_dtype=autocast_dtype(self.cfg.runtime.dtype),
                bos=self.bos,
                progress=self.progress,
                desc=desc,
            ).to_dict()

    def dense_evaluation(self) -> tuple[dict | None, dict | None]:
        """``(perplexity, zero-shot)`` of the dense model, from the shared work where a run with the same model,
        windows and settings computed them (:mod:`maskprune.shared`)."""
        cfg, ev, model = self.cfg, self.cfg.evaluation, self.loaded.model
        settings = {"max_windows": ev.eval_max_windows, "dtype": cfg.dtype, "batch_size": cfg.batch_size,
                    "bos": self.bos, "streamed": self.passes.streamed}  # fmt: skip
        ppl = None
        if self.eval_windows is not None:
            ppl = self.shared.get("dense_perplexity", settings, self.eval_windows, lambda: self.ppl(model, "dense"))
        zs = None
        if self.tasks:
            settings = {"tasks": self.tasks, "data_dir": ev.eval_data_dir, "limit": ev.eval_limit,
                        "batch_size": cfg.batch_size}  # fmt: skip
            zs = self.shared.get("dense_zeroshot", settings, None, lambda: self.zeroshot(model, "dense"))
        return ppl, zs

    def zeroshot(self, m: torch.nn.Module, desc: str) -> dict | None:
        """The configured zero-shot tasks on ``m`` (rank 0; None without tasks)."""
        if not self.tasks or not self.main:
            return None
        with self.phases(f"zeroshot_{desc}"):
            return run_zeroshot(
                m,
                self.loaded.tokenizer,
                self.tasks,
                data_dir=self.cfg.evaluation.eval_data_dir,
                limit=self.cfg.evaluation.eval_limit,
                batch_size=self.cfg.data.batch_size,
                progress=self.progress,
            )


def setup(cfg: PruneConfig, progress: bool) -> RunContext:
    """Everything before the units are chosen: the checks that need no model, then the model, the budget and the
    data, each checked as soon as it exists (bad input fails before any heavy work)."""
    started = time.perf_counter()
    cfg, out, device, tasks = _preflight(cfg)
    phases = Phases()
    with phases("load"):
        # under FSDP the whole model stays in host memory until fully_shard moves each process's shard to
        # its device; the dense evaluation then runs on rank 0 before sharding, on the host
        loaded, adapter = load_source(cfg, torch.device("cpu") if cfg.fsdp and D.world() > 1 else device)
    structure = Structure.of(loaded.model, adapter, cfg.gqa_policy)
    teacher = None
    if cfg.has_teacher:  # nothing is cut: the budget is the student's size, the teacher checked before any work
        budget = structure.dense_params
        if not cfg.resolved_teacher_topk():
            with phases("load_teacher"):
                teacher = load_teacher(cfg, adapter, loaded, device)
    else:
        budget = cfg.budget_for(structure.dense_params)
        check_budget(structure, budget, shaped=cfg.searches_shape())
    check_context(cfg.data, cfg.evaluation, getattr(loaded.model.config, "max_position_embeddings", None))
    with phases("data"):
        windows, val_windows, eval_windows, bos = _data(cfg, loaded.tokenizer)
    log.info(
        "model %s: %s layers, %d params; budget %d (%.1f%% removed); %d calibration windows "
        "of %d tokens; %s%d steps of batch %d",
        loaded.source,
        structure.num_layers,
        structure.dense_params,
        budget,
        100 * (1 - budget / structure.dense_params),
        windows.shape[0],
        cfg.seq_len,
        f"a {cfg.minutes:g}-minute time budget, at most " if cfg.minutes else "",
        cfg.steps,
        cfg.batch_size,
    )
    execution = execution_for(cfg, device)
    topk = val_topk = None
    if cfg.has_teacher and cfg.resolved_teacher_topk():  # the teacher's top-k, window by window from the cache
        with phases("teacher_topk"):
            topk, val_topk = teacher_topk_caches(cfg, adapter, loaded, device, windows, val_windows, execution)
    ctx = RunContext(
        cfg, out, device, D.is_main(), tasks, phases, loaded, adapter, structure, budget, windows,
        eval_windows, bos, progress, teacher, val_windows, started, execution, topk, val_topk,
    )  # fmt: skip
    if cfg.shared_cache and not cfg.has_teacher and ctx.main:  # the dense model's work (a distillation has none)
        ctx.shared = SharedWork(cfg.shared_cache, cfg.model, cfg.gguf_file, str(device))
    return ctx


def execution_for(cfg: PruneConfig, device: torch.device, streamed: bool | None = None) -> Execution:
    """The execution the cut's passes run on: streamed with ``--streaming on`` (or ``streamed``, the plan's answer
    for ``auto``), the activations between layers in the autocast dtype, and a layer kept in host memory visiting
    the GPU for its turn (none is, yet: the model loads whole); resident otherwise."""
    streamed = cfg.streaming == "on" if streamed is None else streamed
    if not streamed:
        return Execution(device)
    offload = torch.device("cpu") if device.type != "cpu" else None
    return Execution(device, streamed=True, offload=offload, store_dtype=autocast_dtype(cfg.dtype, device))


def load_source(cfg: PruneConfig, device: torch.device) -> tuple[LoadedModel, DecoderAdapter]:
    """The model to prune (or the student) in the learning weight dtype on ``device``, with its adapter; fused
    projections (Phi-3) are seen as their parts for the run and fused again at export."""
    loaded = load_model(
        cfg.model,
        gguf_file=cfg.gguf_file,
        trust_remote_code=cfg.trust_remote_code,
        device=device,
        dtype=weight_dtype(cfg),
        offload=on_disk(cfg),
    )
    adapter = adapter_for(loaded.model)
    adapter.unfuse_(loaded.model)
    return loaded, adapter


def _preflight(cfg: PruneConfig) -> tuple[PruneConfig, Path, torch.device, list[str]]:
    """The checks that need no model, in the order that wastes nothing: config, output folder, trackers,
    checkpoints, task data; the dtype settled once (the report, checkpoints and every phase see the same)."""
    cfg.validate()
    out = Path(cfg.out) if cfg.out else default_out(cfg.source, cfg.cut)
    device = resolve_device(cfg.device)
    if cfg.dtype == "auto":
        cfg = cfg.replace(dtype=resolve_dtype(cfg.dtype, device))
    D.init_from_env(device)
    check_output_path(out, cfg.overwrite)
    ExtraSinks.check(cfg.trackers)
    if D.is_main():
        check_checkpoints(out, resume=cfg.resume, overwrite=cfg.overwrite)
    D.barrier()
    tasks = resolve_tasks(cfg.eval_tasks) if cfg.eval_tasks else []
    check_sources(tasks, cfg.eval_data_dir)  # a missing file or an unreachable hub fails now, not after learning
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    return cfg, out, device, tasks


def _data(cfg: PruneConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, str]:
    """``(training windows, held-out windows or None, WikiText-2 windows or None, bos)``."""
    data = cfg.data
    held_out = data.val_windows if cfg.resolved_val_every() and cfg.method == "maskprune" else 0
    windows = calibration_windows(
        data.calib, tokenizer, seq_len=data.seq_len, num_windows=data.calib_samples + held_out, config=data.calib_config
    )
    if held_out and data.val_every is None and windows.shape[0] < data.calib_samples + held_out:
        log.info(
            "no held-out validation: the calibration text gives %d windows, no more than are trained on", len(windows)
        )
        windows, held_out = windows[: data.calib_samples], 0  # automatic validation only with text to spare
    windows, val_windows = _hold_out(windows, held_out, data)
    eval_windows, bos = (None, "")
    if cfg.eval_data != "none":
        eval_windows, bos = tokenize_windows(wikitext2_test_text(cfg.eval_data), tokenizer, cfg.eval_seq_len)
    if cfg.method == "maskprune" and windows.shape[0] < data.batch_size:
        raise MaskPruneError(
            f"the calibration text gives {windows.shape[0]} windows of {data.seq_len} tokens, fewer "
            f"than one batch of {data.batch_size}",
            fix="give more calibration text, or lower --batch-size / --seq-len",
        )
    return windows, val_windows, eval_windows, bos


def _hold_out(windows: torch.Tensor, held_out: int, data: DataConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(training windows, held-out windows or None)``: the last ``held_out`` windows of the calibration text
    are held out (with enough text, exactly the ones after the ``calib_samples`` the run trains on)."""
    if not held_out:
        return windows, None
    if windows.shape[0] < held_out + data.batch_size:
        raise MaskPruneError(
            f"the calibration text gives {windows.shape[0]} windows of {data.seq_len} tokens: too few to hold "
            f"out {held_out} for validation and keep one batch of {data.batch_size} to train on",
            fix="give more calibration text, or lower --val-windows, or drop --val-every",
        )
    if windows.shape[0] < data.calib_samples + held_out:
        log.warning(
            "validation holds out the last %d calibration windows: training uses %d instead of %d",
            held_out,
            windows.shape[0] - held_out,
            data.calib_samples,
        )
    return windows[:-held_out], windows[-held_out:]


def check_context(data: DataConfig, evaluation: EvalConfig, max_pos: int | None) -> None:
    """Refuse a training or evaluation window longer than the model's context (``max_position_embeddings``): once
    the model is loaded, and from its config where the plan refuses the run (such windows are why it does not
    fit)."""
    lengths = {"seq_len": data.seq_len}
    if evaluation.eval_data != "none":
        lengths["eval_seq_len"] = evaluation.eval_seq_len
    for name, value in lengths.items():
        if max_pos is not None and value > max_pos:
            raise MaskPruneError(
                f"{name} {value} is above the model's context",
                expected=f"at most max_position_embeddings = {max_pos}",
                fix=f"lower --{name.replace('_', '-')}",
            )


def check_budget(structure: Structure, budget: int, *, shaped: bool = False) -> None:
    """Refuse a budget that removes nothing, or more than a layer-uniform cut of heads and FFN channels can remove.
    ``shaped``: hidden width or depth is cut too, which reaches further (the embeddings shrink, layers go); whether
    a shape meets the budget was checked from the config before the run (:func:`maskprune.stages.plan.
    check_request`), and the shape search says so again."""
    if budget >= structure.dense_params:
        raise MaskPruneError(
            "the budget removes nothing",
            expected=f"fewer than the dense {structure.dense_params:,} parameters",
            found=f"{budget:,}",
            fix="raise --sparsity or lower --budget-params",
        )
    floor = structure.min_params()
    if budget < floor and not shaped:
        raise MaskPruneError(
            "the budget is below what a layer-uniform cut can reach: it would remove every unit of "
            "a kind in every layer",
            expected=f"at least {floor:,} parameters (sparsity at most "
            f"{1 - floor / structure.dense_params:.3f}; embeddings and norms are not pruned)",
            found=f"{budget:,} ({1 - budget / structure.dense_params:.3f} sparsity)",
            fix="lower --sparsity",
        )
