"""The teacher of a distillation: loaded frozen in the autocast dtype, and refused before any heavy work when
the student cannot learn from it."""

from __future__ import annotations

import logging

import torch

from ..arch import DecoderAdapter
from ..config import PruneConfig
from ..dtypes import autocast_dtype
from ..errors import MaskPruneError
from ..models import LoadedModel, load_model

__all__ = ["check_teacher", "load_teacher", "teacher_topk_caches"]

log = logging.getLogger(__name__)


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
    """``(top-k of the training windows, of the held-out windows or None)`` (:class:`maskprune.teacher_cache.
    WindowTopK`), window by window from the cache. The held-out windows are filled now (every validation scores
    them). Resident, a training window the cache lacks is computed when a step first draws it, the teacher loaded
    then and kept, as a full-vocabulary run keeps it. Streamed (a model too large to keep resident twice), every
    window the run can draw in its ``steps`` is filled now in one pass and the teacher freed. The teacher is checked
    against the student either way (from its config and tokenizer alone where it is never loaded)."""
    from ..learner import window_batch
    from ..teacher_cache import TopKStore, WindowTopK, teacher_key

    k, dtype, batch = cfg.resolved_teacher_topk(), cfg.dtype, cfg.batch_size
    vocab = student.model.config.vocab_size  # the teacher's too (check_teacher)
    if cfg.teacher_topk is None:  # the default: at most the vocabulary (all of it: the exact full KL)
        k = min(k, vocab)
    elif k > vocab:
        raise MaskPruneError(
            f"teacher_topk {k} is above the vocabulary ({vocab} tokens)",
            fix="lower --teacher-topk (0: the full vocabulary)",
        )
    amp = autocast_dtype(dtype)
    held: dict = {}

    def teacher():
        if "model" not in held:
            held["model"] = load_teacher(cfg, adapter, student, device)
        return held["model"]

    def logits(w: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return teacher()(input_ids=w.to(device), use_cache=False).logits

    def passes(w: torch.Tensor):
        return execution.logits(teacher(), adapter, w, batch, autocast=amp)

    store = TopKStore(teacher_key(cfg.teacher, cfg.teacher_gguf_file, k, dtype))
    train = WindowTopK(windows, k, store, logits, batch)
    val = WindowTopK(val_windows, k, store, logits, batch) if val_windows is not None else None
    if val is not None:
        val.fill(range(len(val)), passes)
    if execution.streamed:
        n = windows.shape[0]
        drawn = torch.cat([window_batch(n, batch, cfg.seed, t) for t in range(max(1, cfg.steps))]).tolist()
        train.fill(drawn, passes)
        held.clear()  # the steps read the cache only; a window missed after all reloads the teacher
    if "model" not in held:  # not loaded (yet): check the teacher from its config and tokenizer alone
        _check_teacher_source(cfg, adapter, student)
    for name, top in (("held-out", val), ("training", train)):
        if top is not None and (top.read or top.computed):
            log.info("teacher top-%d of the %s windows: %s", k, name, top.summary())
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
