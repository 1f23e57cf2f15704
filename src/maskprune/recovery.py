"""``maskprune distill``: recover a pruned model by distillation from its dense original.

The student is any pruned checkpoint of a supported family that loads in transformers (ours, a one-shot
method's, a peer's); the teacher is the dense model it came from. Every step is the learner's step with a
separate teacher and nothing left to select: the student keeps all its units (masks at 1, frozen at step 0),
LoRA adapters (merged at the end) or every weight (``--full``) learn KL to the teacher's logits, optionally
with LM cross-entropy and the hidden-state MSE (the hidden size is unchanged). Checkpoints, exact resume,
the staged output, the parity-checked export and the report are prune's own (:mod:`maskprune.pipeline`).
"""

from __future__ import annotations

import dataclasses

from .arch import DecoderAdapter
from .config import DISTILL_SETTINGS, PruneConfig
from .errors import MaskPruneError

__all__ = ["check_teacher", "distill", "distill_config"]


def distill_config(cfg: PruneConfig) -> PruneConfig:
    """``cfg`` with what distillation fixes: no mask learning, the structure kept (see DISTILL_SETTINGS)."""
    if cfg.teacher is None:
        raise MaskPruneError(
            "distill needs a teacher", fix="pass --teacher DENSE (the model the student was pruned from)"
        )
    return dataclasses.replace(cfg, **DISTILL_SETTINGS).validate()


def distill(cfg: PruneConfig, *, progress: bool = True) -> dict:
    """Distil ``cfg.model`` (the pruned student) from ``cfg.teacher``; return the report."""
    from .pipeline import prune

    return prune(distill_config(cfg), progress=progress)


def check_teacher(adapter: DecoderAdapter, student, student_tok, teacher, teacher_tok) -> None:
    """Refuse, before any heavy work, a teacher the student cannot learn from: another tokenizer or
    vocabulary, another family, another hidden size or depth, or a student larger than its teacher."""
    problems = []
    if type(teacher).__name__ != type(student).__name__ or teacher.config.model_type != student.config.model_type:
        problems.append(
            f"family: student {student.config.model_type} ({type(student).__name__}), "
            f"teacher {teacher.config.model_type} ({type(teacher).__name__})"
        )
    else:
        s, t = adapter.shape(student.config), adapter.shape(teacher.config)
        for key in ("hidden_size", "num_hidden_layers", "vocab_size", "head_dim"):
            if s[key] != t[key]:
                problems.append(f"{key}: student {s[key]}, teacher {t[key]} (structured pruning keeps it)")
        for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            if s[key] > t[key]:
                problems.append(f"{key}: student {s[key]} > teacher {t[key]} (a pruned model has at most as many)")
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        only_s = len(set(student_tok.get_vocab()) - set(teacher_tok.get_vocab()))
        only_t = len(set(teacher_tok.get_vocab()) - set(student_tok.get_vocab()))
        problems.append(
            f"tokenizer: the vocabularies differ ({len(student_tok.get_vocab())} vs {len(teacher_tok.get_vocab())} "
            f"tokens; {only_s} only in the student's, {only_t} only in the teacher's, or other ids)"
        )
    if problems:
        raise MaskPruneError(
            "the teacher is not the dense original of this student",
            found="; ".join(problems),
            fix="pass as --teacher the model the student was pruned from",
        )


# ---- prune --recover-steps: the cut, then distill's code on the exported model -------------------------------
_CUT_KEYS = ("model", "gguf_file", "sparsity", "budget_params", "method", "steps", "seed", "calib", "calib_samples")


def prune_and_recover(cfg: PruneConfig, *, progress: bool = True) -> dict:
    """``maskprune prune --recover-steps N``: prune into ``<out>.cut``, distil that export from the dense model
    for N steps into ``out``, and write one report and model card that tell both phases. ``<out>.cut`` is
    removed once ``out`` is complete; with ``--resume`` a finished cut of the same run is reused."""
    import json
    import os
    import shutil
    from pathlib import Path

    from .modelcard import write_model_card
    from .outputs import check_output_path, default_out
    from .pipeline import run_stage

    cfg.validate()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MaskPruneError(
            "--recover-steps runs in one process",
            found=f"a launcher with WORLD_SIZE={os.environ['WORLD_SIZE']}",
            fix="under torchrun / accelerate, run `maskprune prune` and then `maskprune distill` (both data-parallel)",
        )
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    check_output_path(out, cfg.overwrite)
    cut_dir = out.with_name(out.name + ".cut")
    cut_cfg = dataclasses.replace(cfg, recover_steps=0, full=False, out=str(cut_dir), overwrite=True)
    rec_cfg = distill_config(  # settled (and checked) before the cut, so a bad setting costs no cut
        dataclasses.replace(
            cfg,
            model=str(cut_dir),
            gguf_file=None,
            teacher=cfg.model,
            teacher_gguf_file=cfg.gguf_file,
            steps=cfg.recover_steps,
            recover_steps=0,
            out=str(out),
            report=False,
        )
    )
    cut = _finished_cut(cut_dir, cut_cfg) if cfg.resume else None
    if cut is None:
        cut = run_stage(cut_cfg, progress=progress)
    known = (cut["perplexity"]["exported"], (cut.get("zeroshot") or {}).get("exported"))
    rec = run_stage(rec_cfg, progress=progress, student_eval=known)
    report = _merge(cut, rec)
    if (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").rename(out / "recovery_metrics.jsonl")
    for name in ("masks.pt", "metrics.jsonl"):
        if (cut_dir / name).exists():
            shutil.copy2(cut_dir / name, out / name)  # the learning run's; the recovery's metrics are beside them
    if (cut_dir / "report").is_dir():
        shutil.copytree(cut_dir / "report", out / "report", dirs_exist_ok=True)
    (out / "maskprune_report.json").write_text(json.dumps({k: v for k, v in report.items() if k != "out"}, indent=1))
    write_model_card(out, report)
    shutil.rmtree(cut_dir, ignore_errors=True)
    return report


def _finished_cut(cut_dir, cut_cfg: PruneConfig) -> dict | None:
    """The report of a finished cut of the same run in ``cut_dir`` (reused by --resume), else None."""
    import json

    path = cut_dir / "maskprune_report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    done = report.get("config", {})
    if any(done.get(k) != getattr(cut_cfg, k) for k in _CUT_KEYS):
        return None
    report["out"] = str(cut_dir)
    return report


def _merge(cut: dict, rec: dict) -> dict:
    """One report for prune + recovery: the cut's (model, structure, selection, dense figures) with the
    recovery's training, evaluation of the final model, parity and timings."""
    report = dict(cut)
    report["config"] = {
        **cut["config"],
        "recover_steps": rec["distill"]["steps"],
        "full": rec["config"]["full"],
        "out": rec["config"]["out"],
    }
    report["recovery"] = {**rec["distill"], "teacher": cut["config"]["model"]}
    ppl = dict(cut["perplexity"])
    ppl["before_recovery"], ppl["exported"] = cut["perplexity"]["exported"], rec["perplexity"]["exported"]
    report["perplexity"] = ppl
    if cut.get("zeroshot") or rec.get("zeroshot"):
        zs = dict(cut.get("zeroshot") or {})
        zs["before_recovery"], zs["exported"] = zs.get("exported"), (rec.get("zeroshot") or {}).get("exported")
        report["zeroshot"] = zs
    report["parity"], report["roundtrip"] = rec["parity"], rec["roundtrip"]
    report["seconds"] = {
        "prune": cut["seconds"],
        "recovery": rec["seconds"],
        "total": round(cut["seconds"]["total"] + rec["seconds"]["total"], 3),
    }
    report["out"] = rec["out"]
    return report
