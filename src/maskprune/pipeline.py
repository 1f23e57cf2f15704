"""The one recipe: load -> attach -> learn -> cut -> export -> verify -> evaluate -> report.

The output folder is written under a temporary name beside ``out`` and renamed only when every
step, the parity check included, has passed; a failure leaves no folder that looks finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from . import __version__
from . import distributed as D
from .arch import adapter_for, count_parameters
from .compensate import add_biases_, layer_deltas
from .config import PruneConfig
from .cut import cut_mass_share
from .data import calibration_windows, wikitext2_test_text
from .dtypes import DTYPES, autocast_dtype, resolve_dtype
from .errors import MaskPruneError
from .evaluate import perplexity, tokenize_windows
from .export import fold_and_slice_, harden_, masked_logits, save_and_verify, verify_parity
from .learned import check_checkpoints, checkpoint_dir, learn_and_plan, validation_curve
from .modelcard import write_model_card
from .models import load_model
from .oneshot import score_and_plan
from .outputs import Phases, check_output_path, default_out, machine_info, resolve_device, staging
from .recovery import check_teacher
from .report import make_report
from .selection import Outcome, rebuild_for_export, weight_dtype
from .sinks import ExtraSinks
from .structure import Structure
from .zeroshot import load_local_rows, resolve_tasks, run_zeroshot

__all__ = ["prune", "check_output_path", "resolve_device"]

log = logging.getLogger(__name__)


def prune(cfg: PruneConfig, *, progress: bool = True) -> dict:
    """Run the whole pipeline; return the report (also written as ``maskprune_report.json``).

    Under a launcher (``torchrun``, ``accelerate launch``) every process calls this; the process group it
    joins is destroyed before it returns or raises (a group the caller created is left alone)."""
    try:
        if cfg.gguf:  # the converter (and the quantizer) are checked before any work, not after it
            from .gguf_export import preflight

            preflight(cfg.gguf)
        if cfg.recover_steps and not cfg.distilling:
            from .recovery import prune_and_recover

            report = prune_and_recover(cfg, progress=progress)
        else:
            report = _prune(cfg, progress=progress)
        if cfg.gguf and "params" in report:
            report["gguf"] = _write_gguf(Path(report["out"]), cfg.gguf)
        return report
    finally:
        D.shutdown()


def _write_gguf(out: Path, gguf_type: str) -> dict:
    """``--gguf TYPE``: the finished export converted by llama.cpp, recorded in its report."""
    from .gguf_export import export_gguf

    path = export_gguf(out, gguf_type=gguf_type)
    entry = {"file": path.name, "type": gguf_type.lower(), "bytes": path.stat().st_size}
    report_path = out / "maskprune_report.json"
    saved = json.loads(report_path.read_text())
    saved["gguf"] = entry
    report_path.write_text(json.dumps(saved, indent=1))
    log.info("wrote %s (%.1f MB)", path, entry["bytes"] / 1e6)
    return entry


def run_stage(cfg: PruneConfig, *, progress: bool = True, student_eval: tuple | None = None) -> dict:
    """One stage of a run (a prune, or a distillation) without shutting the process group down; for
    :func:`maskprune.recovery.prune_and_recover`. ``student_eval``: the (perplexity, zero-shot) of a distill
    student measured already (the cut's export), used instead of evaluating it again."""
    return _prune(cfg, progress=progress, student_eval=student_eval)


@dataclasses.dataclass
class _Run:
    """What the stages of one run share once the run is set up: settled config, devices, model and data."""

    cfg: PruneConfig
    out: Path
    device: torch.device
    main: bool
    tasks: list[str]
    phases: Phases
    loaded: object  # models.LoadedModel
    adapter: object  # arch.DecoderAdapter
    structure: Structure
    budget: int
    windows: torch.Tensor
    eval_windows: torch.Tensor | None
    bos: str
    progress: bool
    teacher: object | None = None  # distill: the dense teacher (frozen, no gradient)
    val_windows: torch.Tensor | None = None  # held-out calibration windows (--val-every)

    def ppl(self, m: torch.nn.Module, desc: str) -> dict | None:
        """WikiText-2 perplexity of ``m`` (rank 0; None without eval data)."""
        if self.eval_windows is None or not self.main:
            return None
        with self.phases(f"eval_{desc}"):
            return perplexity(
                m,
                self.eval_windows,
                batch_size=self.cfg.batch_size,
                max_windows=self.cfg.eval_max_windows,
                autocast_dtype=autocast_dtype(self.cfg.dtype),
                bos=self.bos,
                progress=self.progress,
                desc=desc,
            ).to_dict()

    def zeroshot(self, m: torch.nn.Module, desc: str) -> dict | None:
        """The configured zero-shot tasks on ``m`` (rank 0; None without tasks)."""
        if not self.tasks or not self.main:
            return None
        with self.phases(f"zeroshot_{desc}"):
            return run_zeroshot(
                m,
                self.loaded.tokenizer,
                self.tasks,
                data_dir=self.cfg.eval_data_dir,
                limit=self.cfg.eval_limit,
                batch_size=self.cfg.batch_size,
                progress=self.progress,
            )


def _prune(cfg: PruneConfig, *, progress: bool = True, student_eval: tuple | None = None) -> dict:
    """The stages of one run (setup, dense evaluation, choosing the units, cut, export, report) inside the
    staging folder. Long because the report is assembled here from every stage's result, in one place."""
    t_start = time.perf_counter()
    run = _setup(cfg, progress)
    cfg, main, phases = run.cfg, run.main, run.phases
    report: dict = {
        "maskprune_version": __version__,
        "config": cfg.to_dict(),
        "model": {
            "source": run.loaded.source,
            "path": run.loaded.path,
            "model_type": run.adapter.model_type,
        },
        "machine": {
            **machine_info(run.device),
            "processes": D.world(),
            "sharding": "fsdp2" if cfg.fsdp and D.world() > 1 else "replicated",
        },
    }
    if student_eval is not None:
        ppl_dense, zs_dense = student_eval
    else:
        ppl_dense = run.ppl(run.loaded.model, "dense")
        zs_dense = run.zeroshot(run.loaded.model, "dense")
    ckpt_dir = checkpoint_dir(run.out)
    with staging(run.out, cfg.overwrite) if main else contextlib.nullcontext(None) as tmp:
        outcome = _choose_units(run, ckpt_dir)
        if not main:  # rank 0 alone cuts, exports, evaluates and writes
            log.info("rank %d done learning", D.rank())
            return {"rank": D.rank(), "final_state": outcome.state.to_dict() if outcome.state else None}
        if cfg.method == "maskprune":
            shutil.copy2(ckpt_dir / "metrics.jsonl", tmp / "metrics.jsonl")
        soft = {"head": outcome.masks.head.detach().clone(), "ffn": outcome.masks.ffn.detach().clone()}
        # Evaluations that would repeat one already made are not run again: a one-shot baseline's model before
        # the cut is the dense model (masks at 1), and a frozen selection is already the cut (hard masks).
        ppl_before_cut = ppl_dense if outcome.state is None else run.ppl(outcome.model, "before_cut")
        with phases("cut"):
            harden_(outcome.masks, outcome.kept)
        frozen = outcome.state is not None and outcome.state.frozen_at is not None
        ppl_after_cut = ppl_before_cut if frozen else run.ppl(outcome.model, "after_cut")
        exported = _export(run, outcome, soft, tmp)
        report.update(_structure_sections(run, outcome, exported.model))
        report.update(_selection_sections(run, outcome, soft))
        if cfg.distilling:
            report["distill"] = {
                "teacher": cfg.teacher,
                "mode": "full" if cfg.full else f"lora rank {cfg.lora_rank}",
                "steps": outcome.state.step,
                "tokens": outcome.state.step * cfg.batch_size * cfg.seq_len,
                "seconds": phases.seconds.get("learn"),
                "calib": cfg.calib,
            }
        if run.val_windows is not None:  # held-out scores along the run: in the distill section for a distillation
            curve = validation_curve(tmp / "metrics.jsonl", cfg)
            (report["distill"] if cfg.distilling else report)["validation"] = curve
        report.update(
            {
                "perplexity": {
                    "protocol": "WikiText-2 raw test, non-overlapping windows, exp(mean NLL)",
                    "dense": ppl_dense,
                    "before_cut": ppl_before_cut,
                    "after_cut": ppl_after_cut,
                    "exported": run.ppl(exported.model, "exported"),
                },
                "zeroshot": {"dense": zs_dense, "exported": run.zeroshot(exported.model, "exported")}
                if run.tasks
                else None,
                "parity": exported.parity.to_dict(),
                "roundtrip": {**exported.roundtrip.to_dict(), "dtype": str(exported.dtype).replace("torch.", "")},
                "seconds": {**phases.seconds, "total": round(time.perf_counter() - t_start, 3)},
            }
        )
        (tmp / "maskprune_report.json").write_text(json.dumps(report, indent=1))
        torch.save(soft, tmp / "masks.pt")
        write_model_card(tmp, report)
        if cfg.report and cfg.method == "maskprune":  # the figures are of the learning run
            with phases("report"):
                make_report(tmp)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the run is complete; its checkpoints are spent
    shape = report["shape"]
    log.info(
        "wrote %s: %d -> %d parameters (%.1f%% removed), %d heads / %d KV / FFN %d per layer",
        run.out,
        run.structure.dense_params,
        report["params"]["exported"],
        100 * report["params"]["sparsity"],
        shape["num_attention_heads"],
        shape["num_key_value_heads"],
        shape["intermediate_size"],
    )
    report["out"] = str(run.out)
    return report


def _setup(cfg: PruneConfig, progress: bool) -> _Run:
    """Everything before the units are chosen: checks that need no model, then the model, the budget and
    the data, each checked as soon as it exists (bad input fails before any heavy work). Long because the
    checks must run in this order, each before the first thing that would be wasted without it."""
    cfg.validate()
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    device = resolve_device(cfg.device)
    if cfg.dtype == "auto":  # settled once, so the report, checkpoints and every phase see the same dtype
        cfg = dataclasses.replace(cfg, dtype=resolve_dtype(cfg.dtype, device))
    D.init_from_env(device)
    main = D.is_main()
    check_output_path(out, cfg.overwrite)
    ExtraSinks.check(cfg.trackers)
    if main:
        check_checkpoints(out, cfg)
    D.barrier()
    tasks = resolve_tasks(cfg.eval_tasks) if cfg.eval_tasks else []
    if tasks and cfg.eval_data_dir is not None:
        for t in tasks:
            load_local_rows(t, cfg.eval_data_dir)  # a missing or malformed file fails now, not after learning
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    phases = Phases()
    with phases("load"):
        # under FSDP the whole model stays in host memory until fully_shard moves each process's shard to
        # its device; the dense evaluation then runs on rank 0 before sharding, on the host
        loaded = load_model(
            cfg.model,
            gguf_file=cfg.gguf_file,
            trust_remote_code=cfg.trust_remote_code,
            device=torch.device("cpu") if cfg.fsdp and D.world() > 1 else device,
            dtype=weight_dtype(cfg),
        )
    model = loaded.model
    adapter = adapter_for(model)
    adapter.unfuse_(model)  # fused projections (Phi-3) seen as their parts for the run; fused again at export
    structure = Structure.of(model, adapter, cfg.gqa_policy)
    teacher = None
    if cfg.distilling:  # nothing is cut: the budget is the student's size, the teacher checked before any work
        budget = structure.dense_params
        with phases("load_teacher"):
            teacher = _load_teacher(cfg, adapter, loaded, device)
    else:
        budget = cfg.budget_for(structure.dense_params)
        _check_budget(structure, budget, cfg)
    _check_context(cfg, getattr(model.config, "max_position_embeddings", None))
    with phases("data"):
        held_out = cfg.val_windows if cfg.val_every and cfg.method == "maskprune" else 0
        windows = calibration_windows(
            cfg.calib,
            loaded.tokenizer,
            seq_len=cfg.seq_len,
            num_windows=cfg.calib_samples + held_out,
            config=cfg.calib_config,
        )
        windows, val_windows = _hold_out(windows, held_out, cfg)
        eval_windows, bos = (None, "")
        if cfg.eval_data != "none":
            eval_windows, bos = tokenize_windows(wikitext2_test_text(cfg.eval_data), loaded.tokenizer, cfg.eval_seq_len)
    if cfg.method == "maskprune" and windows.shape[0] < cfg.batch_size:
        raise MaskPruneError(
            f"the calibration text gives {windows.shape[0]} windows of {cfg.seq_len} tokens, fewer "
            f"than one batch of {cfg.batch_size}",
            fix="give more calibration text, or lower --batch-size / --seq-len",
        )
    log.info(
        "model %s: %s layers, %d params; budget %d (%.1f%% removed); %d calibration windows "
        "of %d tokens; %d steps of batch %d",
        loaded.source,
        structure.num_layers,
        structure.dense_params,
        budget,
        100 * (1 - budget / structure.dense_params),
        windows.shape[0],
        cfg.seq_len,
        cfg.steps,
        cfg.batch_size,
    )
    return _Run(
        cfg,
        out,
        device,
        main,
        tasks,
        phases,
        loaded,
        adapter,
        structure,
        budget,
        windows,
        eval_windows,
        bos,
        progress,
        teacher,
        val_windows,
    )


def _hold_out(windows: torch.Tensor, held_out: int, cfg: PruneConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(training windows, held-out windows or None)``: the last ``held_out`` windows of the calibration text
    are held out (with enough text, exactly the ones after the ``calib_samples`` the run trains on)."""
    if not held_out:
        return windows, None
    if windows.shape[0] < held_out + cfg.batch_size:
        raise MaskPruneError(
            f"the calibration text gives {windows.shape[0]} windows of {cfg.seq_len} tokens: too few to hold "
            f"out {held_out} for validation and keep one batch of {cfg.batch_size} to train on",
            fix="give more calibration text, or lower --val-windows, or drop --val-every",
        )
    if windows.shape[0] < cfg.calib_samples + held_out:
        log.warning(
            "validation holds out the last %d calibration windows: training uses %d instead of %d",
            held_out,
            windows.shape[0] - held_out,
            cfg.calib_samples,
        )
    return windows[:-held_out], windows[-held_out:]


def _load_teacher(cfg: PruneConfig, adapter, student, device: torch.device):
    """The dense teacher for distillation, checked against the student, frozen, in the autocast dtype."""
    teacher = load_model(
        cfg.teacher,
        gguf_file=cfg.teacher_gguf_file,
        trust_remote_code=cfg.trust_remote_code,
        device=device,
        dtype=autocast_dtype(cfg.dtype) or torch.float32,
    )
    check_teacher(adapter, student.model, student.tokenizer, teacher.model, teacher.tokenizer)
    teacher.model.requires_grad_(False)
    return teacher.model.eval()


def _check_context(cfg: PruneConfig, max_pos: int | None) -> None:
    for name in ("seq_len", "eval_seq_len") if cfg.eval_data != "none" else ("seq_len",):
        if max_pos is not None and getattr(cfg, name) > max_pos:
            raise MaskPruneError(
                f"{name} {getattr(cfg, name)} is above the model's context",
                expected=f"at most max_position_embeddings = {max_pos}",
                fix=f"lower --{name.replace('_', '-')}",
            )


def _choose_units(run: _Run, ckpt_dir: Path) -> Outcome:
    """The learned method or a one-shot baseline; either way an fp32 model with masks, plan and kept units."""
    cfg, main = run.cfg, run.main
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    args = (cfg, run.loaded.model, run.adapter, run.structure, run.windows, run.budget, run.device)
    if cfg.method == "maskprune":
        return learn_and_plan(
            *args,
            main,
            run.progress,
            run.phases,
            ckpt_dir,
            ckpt_dir / "metrics.jsonl",
            teacher=run.teacher,
            val_windows=run.val_windows,
        )
    outcome = score_and_plan(*args, run.phases)
    if weight_dtype(cfg) != torch.float32:  # fold and verify in fp32, as for the learned masks
        outcome.model, outcome.masks = rebuild_for_export(
            cfg, outcome.model, run.adapter, run.structure, outcome.masks, run.device, main
        )
    return outcome


@dataclasses.dataclass
class _Exported:
    model: torch.nn.Module
    parity: object  # export.ParityReport of the fold
    roundtrip: object  # export.ParityReport of save + reload
    dtype: torch.dtype
    params: int


def _export(run: _Run, outcome: Outcome, soft: dict, folder: Path) -> _Exported:
    """Merge LoRA, fold the masks, slice, check parity with the masked model, add the compensating biases,
    cast, save to ``folder`` and check the reloaded checkpoint; the parameter count must match the plan."""
    cfg, model, kept = run.cfg, outcome.model, outcome.kept
    probe = run.windows[:2, : min(cfg.seq_len, 64)]
    reference = masked_logits(model, probe)
    with run.phases("export"):
        outcome.masks.detach()
        base = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        head = run.structure.head
        deltas = (
            layer_deltas(base, run.adapter, head, outcome.means, kept, outcome.compensation)
            if outcome.compensation
            else None
        )
        fold_and_slice_(base, run.adapter, head, soft["head"], soft["ffn"], kept)
        # The fold is checked in fp32 (the model here is fp32: learned so, or rebuilt for the export):
        # merging LoRA and folding masks reorder fp32 sums; through SmolLM2's 30 layers (activation
        # outliers ~1e2) that measured up to 1.2e-4 of the largest logit (L0 masks, whose sampled gates
        # grow LoRA more). 1e-3 stays far below what a folding bug does (a wrong head or channel moves
        # logits by O(1)). Then the finished model is cast to the export dtype, saved, reloaded with
        # plain from_pretrained and compared with itself in memory.
        parity = verify_parity(base, probe, reference, tolerance=1e-3)
        if deltas is not None:  # after the parity check: the compensation changes the function on purpose
            add_biases_(base, run.adapter, deltas, outcome.compensation)
        run.adapter.fuse_(base)  # the stock layout of fused families (a no-op for the others)
        edtype = _export_dtype(cfg, run.loaded.source_dtype)
        for prm in base.parameters():  # parameters only: buffers (rotary inv_freq) stay as from_pretrained builds them
            prm.data = prm.data.to(edtype)
        base.config.dtype = edtype
        roundtrip = save_and_verify(
            base, run.loaded.tokenizer, folder, probe, masked_logits(base, probe), tolerance=1e-5
        )
    exported = count_parameters(base)
    if exported != outcome.plan.params + outcome.extra_params:
        raise MaskPruneError(
            "internal accounting error: exported parameter count differs from the plan",
            expected=str(outcome.plan.params + outcome.extra_params),
            found=str(exported),
        )
    return _Exported(base, parity, roundtrip, edtype, exported)


def _structure_sections(run: _Run, outcome: Outcome, base: torch.nn.Module) -> dict:
    """The report's ``params`` and ``shape``: sizes against the budget, and the exported shape."""
    s, cfg = run.structure, run.cfg
    exported = count_parameters(base)
    shape = run.adapter.shape(base.config)
    prunable_kept = s.prunable_params - (s.dense_params - exported)
    layout = {
        kind: {"rows": lay.rows, "units_per_row": lay.units_per_row, "params_per_unit": lay.params_per_unit}
        for kind, lay in (("head", s.head), ("ffn", s.ffn))
    }
    return {
        "params": {
            "dense": s.dense_params,
            "budget": run.budget,
            "exported": exported,
            "sparsity": 1 - exported / s.dense_params,
            "prunable_dense": s.prunable_params,
            "prunable_exported": prunable_kept,
            "prunable_removed_share": 1 - prunable_kept / s.prunable_params,
            "budget_slack": run.budget - exported,
        },
        "shape": {
            "num_hidden_layers": s.num_layers,
            **{k: shape[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")},
            "dense": {
                "num_attention_heads": s.head.num_attention_heads,
                "num_key_value_heads": s.head.num_key_value_heads,
                "intermediate_size": s.ffn.units_per_row,
            },
            "gqa_policy": cfg.gqa_policy,
            "unit_layout": layout,
        },
    }


def _selection_sections(run: _Run, outcome: Outcome, soft: dict) -> dict:
    """The report's account of how the units were chosen: the cut, the split, the compensation, the masks."""
    state, kept = outcome.state, outcome.kept
    comp = outcome.compensation
    return {
        "cut": outcome.plan.to_dict(),
        "split_search": outcome.split,
        "calibration": outcome.calibration,
        "bias_compensation": (
            {
                "o_proj": comp.attn,
                "down_proj": comp.mlp,
                "params": outcome.extra_params,
                "protocol": "FLAP: mean calibration input of the cut units through o_proj / down_proj",
            }
            if comp
            else None
        ),
        "kept_units": kept.to_lists(),
        "method": run.cfg.method,
        "final_state": (
            {"sigma": state.sigma, "y": state.y, "z": state.z, "steps": state.step} if state is not None else None
        ),
        "cut_mask_mass_share": {
            "head": cut_mass_share(soft["head"], kept.head),
            "ffn": cut_mass_share(soft["ffn"], kept.ffn),
        },
        "masks": {"head": soft["head"].tolist(), "ffn_summary": _summary(soft["ffn"])},
    }


def _export_dtype(cfg: PruneConfig, source_dtype: torch.dtype | None) -> torch.dtype:
    """The saved checkpoint's dtype: ``auto`` is the dtype the source checkpoint declares (fp32 when it
    declares none or another), so a bf16 model comes out bf16 and an fp32 one fp32 whatever learning used."""
    if cfg.export_dtype == "auto":
        return source_dtype if source_dtype in DTYPES.values() else torch.float32
    return DTYPES[cfg.export_dtype]


def _summary(t: torch.Tensor) -> dict:
    flat = t.reshape(t.shape[0], -1)
    return {"mean_per_layer": flat.mean(1).tolist(), "frac_below_0.1_per_layer": (flat < 0.1).float().mean(1).tolist()}


def _check_budget(structure: Structure, budget: int, cfg: PruneConfig) -> None:
    if budget >= structure.dense_params:
        raise MaskPruneError(
            "the budget removes nothing",
            expected=f"fewer than the dense {structure.dense_params:,} parameters",
            found=f"{budget:,}",
            fix="raise --sparsity or lower --budget-params",
        )
    floor = structure.min_params()
    if budget < floor:
        raise MaskPruneError(
            "the budget is below what a layer-uniform cut can reach: it would remove every unit of "
            "a kind in every layer",
            expected=f"at least {floor:,} parameters (sparsity at most "
            f"{1 - floor / structure.dense_params:.3f}; embeddings and norms are not pruned)",
            found=f"{budget:,} ({1 - budget / structure.dense_params:.3f} sparsity)",
            fix="lower --sparsity",
        )
