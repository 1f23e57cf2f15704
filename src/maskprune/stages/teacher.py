"""The teacher of a distillation: loaded frozen in the autocast dtype, and refused before any heavy work when
the student cannot learn from it."""

from __future__ import annotations

import torch

from ..arch import DecoderAdapter
from ..config import PruneConfig
from ..dtypes import autocast_dtype
from ..errors import MaskPruneError
from ..models import LoadedModel, load_model

__all__ = ["check_teacher", "load_teacher", "teacher_topk_caches"]


def load_teacher(cfg: PruneConfig, adapter: DecoderAdapter, student: LoadedModel, device: torch.device):
    """The dense teacher for distillation, checked against the student, frozen, in the autocast dtype."""
    teacher = load_model(
        cfg.teacher,
        gguf_file=cfg.teacher_gguf_file,
        trust_remote_code=cfg.trust_remote_code,
        device=device,
        dtype=autocast_dtype(cfg.dtype) or torch.float32,
    )
    check_teacher(adapter, student.model, student.tokenizer, teacher.model, teacher.tokenizer, layerwise=cfg.alpha > 0)
    teacher.model.requires_grad_(False)
    return teacher.model.eval()


def check_teacher(
    adapter: DecoderAdapter, student, student_tok, teacher, teacher_tok, *, layerwise: bool = False
) -> None:
    """Refuse, before any heavy work, a teacher the student cannot learn from: another tokenizer or
    vocabulary, another family or head size, a student larger than its teacher in any dimension, or (for the
    layer-wise MSE, ``layerwise``) another hidden size or depth: a hidden or depth cut (``--prune-axes``) makes a
    student narrower or shallower, which the logit distillation does not mind."""
    problems = []
    if type(teacher).__name__ != type(student).__name__ or teacher.config.model_type != student.config.model_type:
        problems.append(
            f"family: student {student.config.model_type} ({type(student).__name__}), "
            f"teacher {teacher.config.model_type} ({type(teacher).__name__})"
        )
    else:
        s, t = adapter.shape(student.config), adapter.shape(teacher.config)
        for key in ("vocab_size", "head_dim") + (("hidden_size", "num_hidden_layers") if layerwise else ()):
            if s[key] != t[key]:
                why = "the layer-wise MSE (--alpha) compares hidden states" if layerwise else "pruning keeps it"
                problems.append(f"{key}: student {s[key]}, teacher {t[key]} ({why})")
        keys = ("num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_size", "num_hidden_layers")
        for key in keys:
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


def teacher_topk_caches(cfg: PruneConfig, adapter: DecoderAdapter, student: LoadedModel, device, windows, val_windows,
                        execution):  # fmt: skip
    """``(top-k of the training windows, of the held-out windows or None)`` (:mod:`maskprune.teacher_cache`): read
    from the cache, or computed in one pass of the teacher, which is then freed. The teacher is checked against the
    student either way (from its config and tokenizer alone when the cache holds both)."""
    from ..teacher_cache import cached_teacher_topk, compute_teacher_topk, teacher_key

    k, dtype = cfg.teacher_topk, cfg.dtype
    held: dict = {}

    def teacher():
        if "model" not in held:
            held["model"] = load_teacher(cfg, adapter, student, device)
        return held["model"]

    def build(w):
        def run():
            model = teacher()
            if k > model.config.vocab_size:
                raise MaskPruneError(
                    f"teacher_topk {k} is above the vocabulary ({model.config.vocab_size} tokens)",
                    fix="lower --teacher-topk (0: the full vocabulary)",
                )
            batch = cfg.batch_size
            passes = lambda: execution.logits(model, adapter, w, batch, autocast=autocast_dtype(dtype))  # noqa: E731
            return compute_teacher_topk(passes, w, k, batch)

        return run

    train = cached_teacher_topk(teacher_key(cfg.teacher, cfg.teacher_gguf_file, windows, k, dtype), build(windows))
    val = None
    if val_windows is not None:
        key = teacher_key(cfg.teacher, cfg.teacher_gguf_file, val_windows, k, dtype)
        val = cached_teacher_topk(key, build(val_windows))
    if "model" not in held:  # every cache was read: check the teacher from its config and tokenizer alone
        _check_teacher_source(cfg, adapter, student)
    held.clear()
    return train, val


def _check_teacher_source(cfg: PruneConfig, adapter: DecoderAdapter, student: LoadedModel) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import _check_architecture, resolve_source

    src = resolve_source(cfg.teacher, cfg.teacher_gguf_file)
    config = _check_architecture(src, cfg.trust_remote_code)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    tok = AutoTokenizer.from_pretrained(src.location, gguf_file=src.gguf_file, trust_remote_code=cfg.trust_remote_code)
    adapter.unfuse_(meta)
    check_teacher(adapter, student.model, student.tokenizer, meta, tok)
