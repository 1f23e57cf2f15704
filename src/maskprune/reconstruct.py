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

__all__ = ["refit_kept_columns", "refit_with_errors", "refit_to_targets", "relative_error", "target_error"]


def refit_kept_columns(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, ridge: float) -> torch.Tensor:
    """The re-fit kept columns ``[out, |K|]`` of ``weight`` ``[out, in]`` given the input Gram ``gram`` ``[in, in]``
    and kept column indices ``kept`` (computed in float64; returned in ``weight``'s dtype): the fit of
    :func:`refit_to_targets` whose targets are the uncut outputs ``W a``, i.e. ``C = W G[:, K]``. Where every
    column is kept the fit is ``W`` itself (returned as is). Memory: ``G[K, K]`` once (solved in place) and
    ``C`` built a block of columns at a time (at an 8B model's FFN, 1.6 GB of float64 instead of 6)."""
    if kept.numel() == weight.shape[1] and bool((kept == torch.arange(weight.shape[1], device=kept.device)).all()):
        return weight.detach().clone()
    w = weight.double()
    g = gram if gram.dtype == torch.float64 else gram.double()
    cross = torch.empty(w.shape[0], kept.numel(), dtype=torch.float64, device=w.device)
    for start in range(0, kept.numel(), 1024):
        cols = kept[start : start + 1024]
        cross[:, start : start + cols.numel()] = w @ g[:, cols]
    w_kept = w[:, kept]
    del w
    g_kk = g[kept[:, None], kept]
    return refit_to_targets(w_kept, g_kk, cross, ridge, overwrite=True).to(weight.dtype)


def refit_with_errors(
    weight: torch.Tensor, grams: list[torch.Tensor], kept: torch.Tensor, ridge: float
) -> tuple[torch.Tensor, float, float]:
    """``(fitted, error before, error after)``: :func:`refit_kept_columns` and the relative output errors of
    :func:`relative_error`, in the memory of about one Gram. ``grams`` holds the input Gram and is emptied: the Gram
    is let go once the errors' terms, ``C = W G[:, K]`` and ``G[K, K]`` are taken from it, before the solve (at an
    8B model's down_proj with its FFN nearly uncut, the whole Gram beside ``G[K, K]`` and a copy for the solve were
    4.9 GB). One product with the whole Gram, ``W G``, gives both the cross moment and ``tr(W G W^T)``; the error
    before the fit needs only the cut columns' block (:func:`_cut_quadratic`). At an 8B model's down_proj this is
    one ``[out, in] x [in, in]`` float64 product where there were three. The error after the fit comes from the fit's
    own equation ``W' (G_KK + lam I) = C + lam W_K``::

        sum_t |W' a_K - W a|^2 = 2 lam tr(W_K W'^T) - tr((C + lam W_K) W'^T) - lam |W'|^2 + tr(W G W^T)."""
    g = grams.pop()
    g = g if g.dtype == torch.float64 else g.double()
    every = kept.numel() == weight.shape[1] and bool((kept == torch.arange(weight.shape[1], device=kept.device)).all())
    cut = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    cut[kept] = False
    num = _cut_quadratic(weight, g, cut.nonzero()[:, 0])
    rows = range(0, weight.shape[0], ERROR_ROWS)
    # one product with the whole Gram per block of rows gives both tr(W G W^T) and the cross moment C = (W G)[:, K]
    den = torch.zeros((), dtype=torch.float64, device=weight.device)
    cross = None if every else torch.empty(weight.shape[0], kept.numel(), dtype=torch.float64, device=weight.device)
    for o in rows:
        w = weight[o : o + ERROR_ROWS].double()
        wg = w @ g
        den += (wg * w).sum()
        if cross is not None:
            cross[o : o + ERROR_ROWS] = wg[:, kept]
        del wg
    den = float(den)
    before = num / max(den, 1e-30)
    if cross is None:
        return weight.detach().clone(), before, 0.0
    g_kk = g[kept[:, None], kept]
    del g  # the last reference: the whole Gram goes before the solve
    w_kept = weight[:, kept].double()
    lam = ridge * float(g_kk.diagonal().mean().clamp_min(1e-12))
    fitted = refit_to_targets(w_kept, g_kk, cross, ridge, overwrite=True)  # cross is now C + lam W_K
    del g_kk
    after = 2 * lam * float((w_kept * fitted).sum()) - float((cross * fitted).sum()) - lam * float(fitted.pow(2).sum())
    after = max(after + den, 0.0) / max(den, 1e-30)
    return fitted.to(weight.dtype), before, after


def _cut_quadratic(weight: torch.Tensor, gram: torch.Tensor, cut: torch.Tensor) -> float:
    """``tr(W_C G[C, C] W_C^T)`` for the cut columns ``C``: the summed square of what a plain cut misses
    (``W_K a_K - W a = -W_C a_C``), from the cut block of the Gram only, ``COLUMN_BLOCK`` of its columns at a time
    (no ``[|C|, |C|]`` copy beside the Gram)."""
    if cut.numel() == 0:
        return 0.0
    w_c = weight[:, cut].double()  # [out, |C|]
    total = torch.zeros((), dtype=torch.float64, device=weight.device)
    for start in range(0, cut.numel(), COLUMN_BLOCK):
        block = cut[start : start + COLUMN_BLOCK]
        total += ((w_c @ gram[cut[:, None], block]) * w_c[:, start : start + block.numel()]).sum()
    return float(total)


COLUMN_BLOCK = 1024
"""Columns of a Gram taken at once where a product needs a block of them (:func:`_cut_quadratic`)."""


def refit_to_targets(
    kept_weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, ridge: float, *, overwrite: bool = False
) -> torch.Tensor:
    """The ridge fit of a projection's kept columns to arbitrary targets ``y``::

        W' = argmin  sum_t |W' a_K(t) - y(t)|^2 + lam |W' - W_K|^2  =  (C + lam W_K) (G_KK + lam I)^-1,

    from the kept inputs' Gram ``gram`` = ``G_KK`` ``[|K|, |K|]``, the cross moment ``cross`` = ``C`` =
    ``sum_t y(t) a_K(t)^T`` ``[out, |K|]`` and the kept columns ``kept_weight`` = ``W_K`` ``[out, |K|]``, with
    ``lam = ridge * mean(diag G_KK)`` (float64). The cross-model re-fit takes ``y`` from the dense model.
    ``overwrite``: ``gram`` (float64) and ``cross`` may be overwritten (no copy of either is made)."""
    g = gram.double()
    lam = ridge * float(g.diagonal().mean().clamp_min(1e-12))
    rhs = cross.double() if overwrite else cross.double().clone()
    rhs.add_(kept_weight.double(), alpha=lam)  # [out, |K|]
    lhs = g if overwrite and g is gram else g.clone()
    lhs.diagonal().add_(lam)  # G + lam I without an identity matrix beside it
    if lam <= 0.0:  # no ridge: a singular Gram has no Cholesky factor; LU, as before
        return torch.linalg.solve(lhs, rhs.T).T
    # W' = rhs lhs^-1  <=>  lhs W'^T = rhs^T; lhs is symmetric positive definite (G + lam I): Cholesky in place
    # factored and solved through the column-major view of the symmetric lhs: LAPACK's layout, so neither the
    # factorization nor the solves copy it (a row-major lhs was copied once, 1.6 GB at an 8B model's FFN)
    factor = lhs.mT
    _, info = torch.linalg.cholesky_ex(factor, out=(factor, torch.empty((), dtype=torch.int32, device=lhs.device)))
    if int(info) != 0:
        from .errors import MaskPruneError

        raise MaskPruneError(
            "the re-fit's Gram matrix is not positive definite even with its ridge",
            found=f"Cholesky failed at column {int(info)}",
            fix="raise --reconstruct-ridge, or run with --no-reconstruct",
        )
    half = torch.linalg.solve_triangular(factor, rhs.T, upper=False)  # L y = rhs^T
    return torch.linalg.solve_triangular(factor.mT, half, upper=True).T  # L^T x = y


ERROR_ROWS = 1024
"""Output rows of a projection whose error terms are formed at once (:func:`relative_error`, :func:`target_error`)."""


def _quadratic(rows, gram: torch.Tensor) -> torch.Tensor:
    """``sum_o r_o^T G r_o`` over the float64 row blocks ``rows`` yields (each ``[b, n]``): ``(r @ G) * r`` a block at
    a time, so the temporaries are ``[b, n]``; an einsum over all rows at once may pick the ``[n, n]`` order (its
    FLOPs are the same), 1.6 GB at an 8B model's FFN beside the Gram."""
    total = torch.zeros((), dtype=torch.float64, device=gram.device)
    for r in rows:
        total += ((r @ gram) * r).sum()
    return total


def relative_error(weight: torch.Tensor, kept_weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor) -> float:
    """``sum_t |W'_K a_K - W a|^2 / sum_t |W a|^2`` from the Gram matrix alone: how much of the uncut output the
    cut projection (kept columns ``kept_weight``) misses on the calibration inputs. Formed ``ERROR_ROWS`` output rows
    at a time (float64 copies of a block of rows, never of the whole weight)."""
    g = gram.double()
    blocks = range(0, weight.shape[0], ERROR_ROWS)

    def diffs():
        for o in blocks:
            d = -weight[o : o + ERROR_ROWS].double()
            d[:, kept] += kept_weight[o : o + ERROR_ROWS].double()
            yield d

    num = _quadratic(diffs(), g)
    den = _quadratic((weight[o : o + ERROR_ROWS].double() for o in blocks), g)
    return float(num / den.clamp_min(1e-30))


def target_error(kept_weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, target_sq: float) -> float:
    """``sum_t |W' a_K - y|^2 / sum_t |y|^2`` from the moments alone (``gram`` = ``G_KK``, ``cross`` = ``C``,
    ``target_sq`` = ``sum_t |y|^2``): how much of the targets the kept columns ``kept_weight`` miss (a block of
    ``ERROR_ROWS`` output rows at a time)."""
    g = gram.double()
    blocks = range(0, kept_weight.shape[0], ERROR_ROWS)
    quad = _quadratic((kept_weight[o : o + ERROR_ROWS].double() for o in blocks), g)
    lin = sum(
        float((kept_weight[o : o + ERROR_ROWS].double() * cross[o : o + ERROR_ROWS].double()).sum()) for o in blocks
    )
    num = quad - 2.0 * lin + target_sq
    return float(num.clamp_min(0.0) / max(target_sq, 1e-30))
