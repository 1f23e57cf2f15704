"""Distillation losses (paper section 3.3): logits and hidden states in, a scalar out. Pure."""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["KLDirection", "LayerMSENorm", "kl_divergence", "layer_mse", "lm_cross_entropy", "summed_nll",
           "distillation_loss"]

KLDirection = Literal["student_teacher", "teacher_student"]
LayerMSENorm = Literal["teacher", "none"]


def _kl_chunk(student: torch.Tensor, teacher: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Summed KL over the rows of one chunk. student, teacher: ``[n, V]``."""
    log_s = F.log_softmax(student.float(), dim=-1)  # [n, V] fp32
    log_t = F.log_softmax(teacher.float(), dim=-1)  # [n, V] fp32
    if reverse:  # KL(p_s || p_t) = sum p_s (log p_s - log p_t)
        return (log_s.exp() * (log_s - log_t)).sum()
    return (log_t.exp() * (log_t - log_s)).sum()  # KL(p_t || p_s)


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                  direction: KLDirection = "student_teacher", chunk_tokens: int = 512) -> torch.Tensor:
    """Mean per-token KL between student and teacher next-token distributions.

    Logits ``[B, T, V]`` in any float dtype. ``direction="student_teacher"`` is the paper's
    ``KL(p_s || p_t)``. The vocabulary-wide fp32 work is done ``chunk_tokens`` rows at a time under
    activation checkpointing, so at most one chunk of full-vocabulary fp32 tensors is alive.
    """
    s = student_logits.reshape(-1, student_logits.shape[-1])  # [B*T, V]
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).detach()  # [B*T, V]
    reverse = direction == "student_teacher"
    total = s.new_zeros((), dtype=torch.float32)
    for start in range(0, s.shape[0], chunk_tokens):
        sc, tc = s[start:start + chunk_tokens], t[start:start + chunk_tokens]
        if torch.is_grad_enabled() and sc.requires_grad:
            total = total + checkpoint(_kl_chunk, sc, tc, reverse, use_reentrant=False)
        else:
            total = total + _kl_chunk(sc, tc, reverse)
    return total / s.shape[0]


def layer_mse(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor], *,
              norm: LayerMSENorm = "teacher") -> torch.Tensor:
    """``sum_l MSE(h_s^l, h_t^l)`` over the layers given (each ``[B, T, hidden]``).

    ``norm="teacher"`` divides each layer's MSE by the teacher's mean square at that layer (a constant,
    no gradient), so the term is scale-free: models with massive activations (hidden states in the
    hundreds) otherwise give raw MSEs 1e4 times the KL and no single ``alpha`` fits (measured on
    SmolLM2, bench/results/2026-11-23-smollm2.md). ``norm="none"`` is the paper's raw sum.
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student vs {len(teacher_hidden)} teacher hidden states")
    terms = []
    for hs, ht in zip(student_hidden, teacher_hidden):
        ht = ht.detach().float()
        term = F.mse_loss(hs.float(), ht)
        if norm == "teacher":
            term = term / ht.pow(2).mean().clamp_min(1e-12)
        terms.append(term)
    return torch.stack(terms).sum()


def summed_nll(logits: torch.Tensor, targets: torch.Tensor, *, rows: int = 16) -> torch.Tensor:
    """``sum_i -log softmax(logits_i)[targets_i]`` in fp32, for inference (no autograd).

    logits: ``[n, V]`` any float dtype; targets: ``[n]``. The fp32 work runs ``rows`` rows at a time: a
    16 x 49k fp32 block (3 MB) stays in cache through the cast, the max, the exp-sum and the gather,
    where ``F.cross_entropy(logits.float())`` streams the whole ``[n, V]`` fp32 copy through memory
    several times (3.5x slower on a 2-core CPU for 2048 x 49152; bench/results/2026-11-24-perf-reading.md). Same
    value up to fp32 summation order.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [n, V] and targets [n], got {tuple(logits.shape)} and {tuple(targets.shape)}")
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], rows):
        x = logits[start:start + rows].float()  # [r, V]
        t = targets[start:start + rows, None]  # [r, 1]
        total += (torch.logsumexp(x, dim=-1) - x.gather(1, t)[:, 0]).sum()
    return total


def lm_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits [B, T, V]`` against ``labels [B, T]`` (fp32)."""
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # [B*(T-1), V]
    return F.cross_entropy(flat, labels[:, 1:].reshape(-1))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, *,
                      student_hidden: Sequence[torch.Tensor] | None = None,
                      teacher_hidden: Sequence[torch.Tensor] | None = None, alpha: float = 0.0,
                      direction: KLDirection = "student_teacher", labels: torch.Tensor | None = None,
                      ce_weight: float = 0.0, chunk_tokens: int = 512,
                      layer_mse_norm: LayerMSENorm = "teacher") -> dict[str, torch.Tensor]:
    """``KL + alpha * layer MSE (+ ce_weight * LM cross-entropy)``; returns every term and ``loss``.

    ``teacher_logits=None`` (distillation off): the loss is the cross-entropy alone, ``labels`` required.
    """
    out: dict[str, torch.Tensor] = {}
    if teacher_logits is None:
        if labels is None:
            raise ValueError("without a teacher the loss is the LM cross-entropy, which needs labels")
        out["ce"] = lm_cross_entropy(student_logits, labels)
        out["loss"] = out["ce"]
        return out
    out["kl"] = kl_divergence(student_logits, teacher_logits, direction=direction,
                              chunk_tokens=chunk_tokens)
    loss = out["kl"]
    if alpha > 0.0 and student_hidden is not None and teacher_hidden is not None:
        out["layer_mse"] = layer_mse(student_hidden, teacher_hidden, norm=layer_mse_norm)
        loss = loss + alpha * out["layer_mse"]
    if ce_weight > 0.0 and labels is not None:
        out["ce"] = lm_cross_entropy(student_logits, labels)
        loss = loss + ce_weight * out["ce"]
    out["loss"] = loss
    return out
