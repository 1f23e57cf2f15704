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
