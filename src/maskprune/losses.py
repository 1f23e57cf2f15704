"""Distillation losses (paper section 3.3): logits and hidden states in, a scalar out. Pure."""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "KLDirection",
    "topk_kl",
    "teacher_topk",
    "LayerMSENorm",
    "kl_divergence",
    "layer_mse",
    "lm_cross_entropy",
    "summed_nll",
    "distillation_loss",
]

KLDirection = Literal["student_teacher", "teacher_student"]
LayerMSENorm = Literal["teacher", "none"]


def _softmax_lse_(x: torch.Tensor) -> torch.Tensor:
    """Turn the fp32 block ``x`` into ``softmax(x)`` in place (one ``exp``); return ``logsumexp(x)`` ``[r]``."""
    m = x.amax(dim=-1, keepdim=True)  # [r, 1]
    z = x.sub_(m).exp_().sum(dim=-1, keepdim=True)  # [r, 1]
    x.div_(z)
    return (m + z.log())[:, 0]


def _kl_block_(s: torch.Tensor, t: torch.Tensor, d: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Per-row KL ``[r]`` of one block; ``s``, ``t``: fp32 logits ``[r, V]``, overwritten (``s`` ends as the
    gradient with respect to the student logits); ``d``: workspace of the same shape.

    With ``log p = x - lse(x)`` and ``d = s - t``: forward ``KL(p_t || p_s) = lse_s - lse_t - sum p_t d``,
    gradient ``p_s - p_t``; reverse ``KL(p_s || p_t) = a - lse_s + lse_t`` with ``a = sum p_s d``, gradient
    ``p_s (d - a)``. One ``exp`` per side, no autograd graph, no allocation of ``[r, V]`` tensors.
    """
    torch.sub(s, t, out=d)
    lse_s = _softmax_lse_(s)  # s = p_s
    lse_t = _softmax_lse_(t)  # t = p_t
    if reverse:
        a = torch.mul(s, d, out=t).sum(-1)  # [r]
        s.mul_(d.sub_(a[:, None]))
        return a - lse_s + lse_t
    kl = lse_s - lse_t - d.mul_(t).sum(-1)  # [r]
    s.sub_(t)
    return kl


class _BlockedKL(torch.autograd.Function):
    """Summed KL over rows, computed ``rows`` rows at a time in three reused fp32 buffers; the gradient is
    formed in the same pass and kept in the student logits' dtype, so backward is one multiply (no
    recomputation, no fp32 ``[n, V]`` tensor, no per-block allocation)."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, reverse: bool, rows: int) -> torch.Tensor:
        n, v = student.shape
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(student) if need_grad else None  # [n, V]
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        s_buf, t_buf, d_buf = (
            torch.empty(min(rows, n), v, dtype=torch.float32, device=student.device) for _ in range(3)
        )
        with torch.autocast(student.device.type, enabled=False):  # fp32 by construction, not autocast's choice
            for start in range(0, n, rows):
                r = min(rows, n - start)
                s, t, d = s_buf[:r], t_buf[:r], d_buf[:r]
                s.copy_(student[start : start + r])
                t.copy_(teacher[start : start + r])
                total += _kl_block_(s, t, d, reverse).sum()
                if grad is not None:
                    grad[start : start + r].copy_(s)
        ctx.save_for_backward(*([grad] if grad is not None else []))
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None


def _default_rows(device: torch.device) -> int:
    # CPU: a 16 x V fp32 block (3 MB at V = 49k) stays in cache through every elementwise op (the eval
    # measurement of summed_nll, 3.5x over whole-tensor ops); GPU: blocks large enough to fill the device.
    return 16 if device.type == "cpu" else 256


def kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    direction: KLDirection = "student_teacher",
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Mean per-token KL between student and teacher next-token distributions.

    Logits ``[B, T, V]`` in any float dtype. ``direction="student_teacher"`` is the paper's
    ``KL(p_s || p_t)``. The vocabulary-wide work is done in fp32, ``chunk_tokens`` rows at a time
    (default: 16 on CPU, 256 on GPU), and the gradient with respect to the student logits is formed in
    the same pass (:class:`_BlockedKL`): at most one block of full-vocabulary fp32 tensors is alive, each
    side's log-softmax is taken once, and backward does no recomputation. The teacher gets no gradient.
    """
    s = student_logits.reshape(-1, student_logits.shape[-1])  # [B*T, V]
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).detach()  # [B*T, V]
    if s.shape != t.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}")
    rows = chunk_tokens or _default_rows(s.device)
    return _BlockedKL.apply(s, t, direction == "student_teacher", rows) / s.shape[0]


def teacher_topk(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The compact teacher of :func:`topk_kl`: ``(log-probabilities [..., k] of the k most likely tokens, their
    indices [..., k], log of the rest's total probability [...])``, from logits ``[..., V]`` (fp32 math)."""
    logits = teacher_logits.float()
    norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # [..., 1]
    top, index = logits.topk(k, dim=-1)  # [..., k]
    rest = logits.scatter(-1, index, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1) - norm[..., 0]  # [...]: -inf where k = V
    return top - norm, index, tail


def topk_kl(
    student_logits: torch.Tensor,
    topk_logprob: torch.Tensor,
    topk_index: torch.Tensor,
    tail_logprob: torch.Tensor,
    *,
    direction: KLDirection = "teacher_student",
) -> torch.Tensor:
    """Mean per-token KL between the teacher and the student over ``k + 1`` outcomes: the teacher's ``k`` most likely
    tokens, each alone, and all the others as one (the tail), as DistillKit's and Megatron's offline-logit KD
    store the teacher. ``student_logits [..., V]``; ``topk_logprob``, ``topk_index [..., k]`` and ``tail_logprob
    [...]`` from :func:`teacher_topk`. The student's distribution is coarsened to the same outcomes, so the result
    is an exact KL between two distributions on ``k + 1`` outcomes: at most the full-vocabulary KL (the data
    processing inequality), equal to it where ``k = V`` or the two agree within the tail. The student's
    log-softmax is taken in fp32."""
    index = topk_index.long()
    s = student_logits.float().log_softmax(dim=-1)  # [..., V]
    s_top = s.gather(-1, index)  # [..., k]
    s_tail = s.scatter(-1, index, float("-inf")).logsumexp(-1)  # [...]: the rest's log share, -inf where k = V
    # an empty tail (-inf) becomes a mass of exactly 0 in fp32 (exp(-1e4)), so its terms vanish, gradients too
    s_tail = s_tail.clamp(min=-1e4)
    t_top, t_tail = topk_logprob.float(), tail_logprob.float().clamp(min=-1e4)
    if direction == "teacher_student":  # KL(p_t || p_s)
        kl = (t_top.exp() * (t_top - s_top)).sum(-1) + t_tail.exp() * (t_tail - s_tail)
    else:  # KL(p_s || p_t)
        kl = (s_top.exp() * (s_top - t_top)).sum(-1) + s_tail.exp() * (s_tail - t_tail)
    return kl.mean()


def layer_mse(
    student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor], *, norm: LayerMSENorm = "teacher"
) -> torch.Tensor:
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
        raise ValueError(
            f"expected logits [n, V] and targets [n], got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], rows):
        x = logits[start : start + rows].float()  # [r, V]
        t = targets[start : start + rows, None]  # [r, 1]
        total += (torch.logsumexp(x, dim=-1) - x.gather(1, t)[:, 0]).sum()
    return total


def lm_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits [B, T, V]`` against ``labels [B, T]`` (fp32)."""
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # [B*(T-1), V]
    return F.cross_entropy(flat, labels[:, 1:].reshape(-1))


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    *,
    student_hidden: Sequence[torch.Tensor] | None = None,
    teacher_hidden: Sequence[torch.Tensor] | None = None,
    alpha: float = 0.0,
    direction: KLDirection = "student_teacher",
    labels: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    chunk_tokens: int | None = None,
    layer_mse_norm: LayerMSENorm = "teacher",
    teacher_topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``KL + alpha * layer MSE (+ ce_weight * LM cross-entropy)``; returns every term and ``loss``.

    ``teacher_logits=None`` (distillation off): the loss is the cross-entropy alone, ``labels`` required.
    ``teacher_topk``: the teacher as its top-k ``(log-probabilities, indices, tail log-mass)`` instead of its
    logits (:func:`topk_kl`; no layer MSE).
    """
    out: dict[str, torch.Tensor] = {}
    if teacher_topk is not None:
        out["kl"] = topk_kl(student_logits, *teacher_topk, direction=direction)
        out["loss"] = out["kl"]
        if ce_weight > 0.0 and labels is not None:
            out["ce"] = lm_cross_entropy(student_logits, labels)
            out["loss"] = out["loss"] + ce_weight * out["ce"]
        return out
    if teacher_logits is None:
        if labels is None:
            raise ValueError("without a teacher the loss is the LM cross-entropy, which needs labels")
        out["ce"] = lm_cross_entropy(student_logits, labels)
        out["loss"] = out["ce"]
        return out
    out["kl"] = kl_divergence(student_logits, teacher_logits, direction=direction, chunk_tokens=chunk_tokens)
    loss = out["kl"]
    if alpha > 0.0 and student_hidden is not None and teacher_hidden is not None:
        out["layer_mse"] = layer_mse(student_hidden, teacher_hidden, norm=layer_mse_norm)
        loss = loss + alpha * out["layer_mse"]
    if ce_weight > 0.0 and labels is not None:
        out["ce"] = lm_cross_entropy(student_logits, labels)
        loss = loss + ce_weight * out["ce"]
    out["loss"] = loss
    return out
