"""A reconstructed cut: the kept columns of an output projection re-fit by ridge regression (pure math).

After a cut, a projection ``W`` ``[out, in]`` sees only its kept input columns ``K``. Over calibration inputs
``a`` (the projection's whole input, kept and cut units, on the already cut prefix) the kept weights are re-fit so
that ``W' a_K`` reproduces the uncut output ``W a``, regularised towards the original kept weights::

    W' = argmin  sum_t |W' a_K(t) - W a(t)|^2 + lam |W' - W_K|^2
       = W (G[:, K] + lam E_K) (G[K, K] + lam I)^-1,        G = sum_t a(t) a(t)^T,

with ``lam = ridge * mean(diag G[K, K])``. Only the input Gram matrix ``G`` is needed. FLAP's bias compensation is
the rank-zero case (the cut units' mean through ``W``); this fit moves the cut units' correlated part onto the kept
ones. SlimGPT / ZipLM's OBS updates and SlimLLM's output regression are fits of this kind.
"""

from __future__ import annotations

import torch

__all__ = ["refit_kept_columns", "refit_to_targets", "relative_error", "target_error"]


def refit_kept_columns(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, ridge: float) -> torch.Tensor:
    """The re-fit kept columns ``[out, |K|]`` of ``weight`` ``[out, in]`` given the input Gram ``gram`` ``[in, in]``
    and kept column indices ``kept`` (computed in float64; returned in ``weight``'s dtype): the fit of
    :func:`refit_to_targets` whose targets are the uncut outputs ``W a``, i.e. ``C = W G[:, K]``."""
    w, g = weight.double(), gram.double()
    return refit_to_targets(w[:, kept], g[kept][:, kept], w @ g[:, kept], ridge).to(weight.dtype)


def refit_to_targets(kept_weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """The ridge fit of a projection's kept columns to arbitrary targets ``y``::

        W' = argmin  sum_t |W' a_K(t) - y(t)|^2 + lam |W' - W_K|^2  =  (C + lam W_K) (G_KK + lam I)^-1,

    from the kept inputs' Gram ``gram`` = ``G_KK`` ``[|K|, |K|]``, the cross moment ``cross`` = ``C`` =
    ``sum_t y(t) a_K(t)^T`` ``[out, |K|]`` and the kept columns ``kept_weight`` = ``W_K`` ``[out, |K|]``, with
    ``lam = ridge * mean(diag G_KK)`` (float64). The cross-model re-fit takes ``y`` from the dense model."""
    g = gram.double()
    lam = ridge * float(g.diagonal().mean().clamp_min(1e-12))
    lhs = g.clone()
    lhs.diagonal().add_(lam)  # G + lam I without an identity matrix beside it (1 GB at an 8B model's FFN)
    rhs = cross.double() + lam * kept_weight.double()  # [out, |K|]
    # W' = rhs lhs^-1  <=>  lhs^T W'^T = rhs^T (lhs is symmetric)
    return torch.linalg.solve(lhs, rhs.T).T


def relative_error(weight: torch.Tensor, kept_weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor) -> float:
    """``sum_t |W'_K a_K - W a|^2 / sum_t |W a|^2`` from the Gram matrix alone: how much of the uncut output the
    cut projection (kept columns ``kept_weight``) misses on the calibration inputs."""
    w, g = weight.double(), gram.double()
    diff = -w.clone()
    diff[:, kept] += kept_weight.double()
    num = torch.einsum("oi,ij,oj->", diff, g, diff)
    den = torch.einsum("oi,ij,oj->", w, g, w)
    return float(num / den.clamp_min(1e-30))


def target_error(kept_weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, target_sq: float) -> float:
    """``sum_t |W' a_K - y|^2 / sum_t |y|^2`` from the moments alone (``gram`` = ``G_KK``, ``cross`` = ``C``,
    ``target_sq`` = ``sum_t |y|^2``): how much of the targets the kept columns ``kept_weight`` miss."""
    w = kept_weight.double()
    num = torch.einsum("oi,ij,oj->", w, gram.double(), w) - 2.0 * torch.sum(w * cross.double()) + target_sq
    return float(num.clamp_min(0.0) / max(target_sq, 1e-30))
