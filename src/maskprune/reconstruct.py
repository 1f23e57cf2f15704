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

__all__ = ["refit_kept_columns", "relative_error"]


def refit_kept_columns(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, ridge: float) -> torch.Tensor:
    """The re-fit kept columns ``[out, |K|]`` of ``weight`` ``[out, in]`` given the input Gram ``gram`` ``[in, in]``
    and kept column indices ``kept`` (computed in float64; returned in ``weight``'s dtype)."""
    w, g = weight.double(), gram.double()
    g_kk = g[kept][:, kept]
    lam = ridge * float(g_kk.diagonal().mean().clamp_min(1e-12))
    rhs = g[:, kept].clone()  # [in, |K|]
    rhs[kept, torch.arange(kept.numel())] += lam  # G[:, K] + lam E_K
    lhs = g_kk + lam * torch.eye(kept.numel(), dtype=torch.float64, device=g.device)
    # W' = W rhs lhs^-1  <=>  lhs^T W'^T = rhs^T W^T (lhs is symmetric)
    fitted = torch.linalg.solve(lhs, (w @ rhs).T).T
    return fitted.to(weight.dtype)


def relative_error(weight: torch.Tensor, kept_weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor) -> float:
    """``sum_t |W'_K a_K - W a|^2 / sum_t |W a|^2`` from the Gram matrix alone: how much of the uncut output the
    cut projection (kept columns ``kept_weight``) misses on the calibration inputs."""
    w, g = weight.double(), gram.double()
    diff = -w.clone()
    diff[:, kept] += kept_weight.double()
    num = torch.einsum("oi,ij,oj->", diff, g, diff)
    den = torch.einsum("oi,ij,oj->", w, g, w)
    return float(num / den.clamp_min(1e-30))
