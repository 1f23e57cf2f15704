"""The ridge re-fit of kept columns: exact where it must be, better than the plain cut, closed form = lstsq."""

import pytest
import torch

from maskprune.reconstruct import refit_kept_columns, refit_to_targets, relative_error, target_error


def _data(seed=0, tokens=400, width=12, out=5):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, 4, generator=g)
    a = base @ torch.randn(4, width, generator=g) + 0.1 * torch.randn(tokens, width, generator=g)  # correlated
    w = torch.randn(out, width, generator=g)
    return a, w


def test_the_fit_is_the_least_squares_solution_without_ridge():
    a, w = _data()
    kept = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    fitted = refit_kept_columns(w, a.double().T @ a.double(), kept, ridge=0.0)
    target = a @ w.T  # [tokens, out]
    ref = torch.linalg.lstsq(a[:, kept].double(), target.double()).solution.T
    assert torch.allclose(fitted.double(), ref, atol=1e-6)


def test_the_fit_lowers_the_error_of_the_plain_cut_and_keeping_everything_is_exact():
    a, w = _data(1)
    g = a.T @ a
    kept = torch.tensor([1, 2, 4, 6, 9, 10])
    plain = relative_error(w, w[:, kept], g, kept)
    fitted = relative_error(w, refit_kept_columns(w, g, kept, ridge=1e-3), g, kept)
    assert fitted < 0.5 * plain  # correlated inputs: the kept columns carry most of the cut ones
    everything = torch.arange(w.shape[1])
    assert torch.allclose(refit_kept_columns(w, g, everything, ridge=1e-2), w, atol=1e-5)
    assert relative_error(w, w, g, everything) < 1e-12


def test_a_large_ridge_keeps_the_original_weights():
    a, w = _data(2)
    kept = torch.tensor([0, 1, 2, 3])
    assert torch.allclose(refit_kept_columns(w, a.T @ a, kept, ridge=1e8), w[:, kept], atol=1e-4)


def test_the_fit_to_other_targets_is_their_least_squares_solution_and_its_error_is_exact():
    """The cross-model form: targets from elsewhere (here a different map of the inputs plus noise)."""
    a, w = _data(seed=1)
    kept = torch.tensor([1, 2, 4, 6, 9, 10])
    g = torch.Generator().manual_seed(5)
    y = a @ torch.randn(w.shape[1], w.shape[0], generator=g) + 0.05 * torch.randn(a.shape[0], w.shape[0], generator=g)
    a_k = a[:, kept].double()
    gram, cross, sq = a_k.T @ a_k, y.double().T @ a_k, float((y.double() ** 2).sum())
    fitted = refit_to_targets(w[:, kept], gram, cross, ridge=0.0)
    lstsq = torch.linalg.lstsq(a_k, y.double()).solution.T
    torch.testing.assert_close(fitted, lstsq, rtol=1e-6, atol=1e-8)
    direct = float(((a_k @ fitted.T - y.double()) ** 2).sum() / sq)
    assert abs(target_error(fitted, gram, cross, sq) - direct) < 1e-9
    assert target_error(fitted, gram, cross, sq) < target_error(w[:, kept], gram, cross, sq)
    # a large ridge keeps the kept columns; the self targets reproduce refit_kept_columns
    torch.testing.assert_close(
        refit_to_targets(w[:, kept], gram, cross, ridge=1e9).float(), w[:, kept], atol=1e-4, rtol=0
    )
    g_full = a.double().T @ a.double()
    torch.testing.assert_close(
        refit_to_targets(w[:, kept], g_full[kept][:, kept], w.double() @ g_full[:, kept], ridge=0.1).float(),
        refit_kept_columns(w, g_full, kept, ridge=0.1),
    )


def test_a_gram_of_fp32_products_summed_in_float64_fits_as_the_float64_one(monkeypatch):
    """The re-fit's Grams take each batch's product in fp32 and sum the batches in float64, a block of rows at a time
    (sequential.add_product_; blocks of 100 rows here, the last one ragged): on activations with outlier channels
    (100x the others, as LLM activations have) the fit and its error are those of the all-float64 Gram, to far below
    what the fit changes."""
    import maskprune.sequential as seq

    monkeypatch.setattr(seq, "PRODUCT_ROWS", 100)
    g = torch.Generator().manual_seed(3)
    width, out, batches = 256, 64, 16
    scale = torch.ones(width)
    scale[:4] = 100.0
    mix = torch.randn(32, width, generator=g)
    acts = [(torch.randn(512, 32, generator=g) @ mix + 0.3 * torch.randn(512, width, generator=g)) * scale
            for _ in range(batches)]  # fmt: skip
    w = torch.randn(out, width, generator=g) / width**0.5
    exact = sum(a.double().T @ a.double() for a in acts)
    mixed = torch.zeros(width, width, dtype=torch.float64)
    whole = torch.zeros(width, width, dtype=torch.float64)
    for a in acts:
        seq.add_product_(mixed, a, a)
        whole += a.T @ a
    torch.testing.assert_close(mixed, whole, rtol=1e-6, atol=0)  # the blocks are the whole product's rows
    monkeypatch.setattr(seq, "GRAM_BLOCK", 48)  # the upper block triangle, mirrored: 256 = 5 x 48 + 16
    half = torch.zeros(width, width, dtype=torch.float64)
    for a in acts:
        seq.add_gram_(half, a)
    assert half[200:, :48].abs().max() == 0  # below the diagonal blocks: nothing computed before the mirror
    torch.testing.assert_close(seq.mirror_(half), whole, rtol=1e-6, atol=0)
    assert torch.equal(half, half.T)
    cross = torch.zeros(out, width, dtype=torch.float64)
    seq.add_product_(cross, acts[0][:, :out], acts[0])  # a moment with fewer rows than a block, and more columns
    torch.testing.assert_close(cross, (acts[0][:, :out].T @ acts[0]).double(), rtol=1e-6, atol=0)
    kept = torch.arange(0, width, 3)
    fit_exact = refit_kept_columns(w, exact, kept, ridge=1e-2)
    fit_mixed = refit_kept_columns(w, mixed, kept, ridge=1e-2)
    moved = (fit_exact - w[:, kept]).norm()
    assert (fit_mixed - fit_exact).norm() < 1e-4 * moved
    err_exact = relative_error(w, fit_exact, exact, kept)
    assert abs(relative_error(w, fit_mixed, exact, kept) - err_exact) < 1e-5 * max(err_exact, 1e-3)


def test_the_errors_a_block_of_rows_at_a_time_equal_the_whole_quadratic_forms(monkeypatch):
    """The errors before and after a fit are formed a few output rows at a time (at an 8B model's down_proj, an
    einsum over all rows built a 1.6 GB [in, in] intermediate); the value is the whole quadratic form's."""
    import maskprune.reconstruct as rc

    monkeypatch.setattr(rc, "ERROR_ROWS", 3)  # 10 rows: blocks of 3, 3, 3 and 1
    g = torch.Generator().manual_seed(5)
    a = torch.randn(200, 24, generator=g, dtype=torch.float64)
    gram = a.T @ a
    w = torch.randn(10, 24, generator=g)
    kept = torch.arange(0, 24, 2)
    fitted = refit_kept_columns(w, gram, kept, ridge=1e-2)
    diff = -w.double()
    diff[:, kept] += fitted.double()
    whole = torch.einsum("oi,ij,oj->", diff, gram, diff) / torch.einsum("oi,ij,oj->", w.double(), gram, w.double())
    assert relative_error(w, fitted, gram, kept) == pytest.approx(float(whole), rel=1e-12)
    y = torch.randn(200, 10, generator=g, dtype=torch.float64)
    gk, cross = gram[kept][:, kept], y.T @ a[:, kept]
    wk = fitted.double()
    exact = float(((a[:, kept] @ wk.T - y) ** 2).sum() / (y**2).sum())
    assert target_error(fitted, gk, cross, float((y**2).sum())) == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("every", [False, True])
def test_the_fit_with_its_errors_in_one_gram_equals_the_fit_and_the_errors_from_the_gram(every, blocks, monkeypatch):
    """refit_with_errors lets the Gram go before its solve, takes the cross moment and tr(W G W^T) from one product
    with the Gram, the error before the fit from the cut columns' block alone (a block of columns at a time) and the
    error after the fit from the fit's equation; the fit and both errors are those of refit_kept_columns and
    relative_error on the whole Gram, whatever the blocks."""
    import maskprune.reconstruct as rc
    from maskprune.reconstruct import refit_with_errors

    if blocks:  # uneven blocks of output rows and of cut columns
        monkeypatch.setattr(rc, "ERROR_ROWS", 7)
        monkeypatch.setattr(rc, "COLUMN_BLOCK", 5)

    g = torch.Generator().manual_seed(7)
    width, out = 96, 40
    scale = torch.ones(width)
    scale[:3] = 50.0  # outlier channels
    a = torch.randn(400, width, generator=g) * scale
    gram = a.double().T @ a.double()
    w = torch.randn(out, width, generator=g) / width**0.5
    kept = torch.arange(width) if every else torch.sort(torch.randperm(width, generator=g)[:70]).values
    grams = [gram.clone()]
    fitted, before, after = refit_with_errors(w, grams, kept, ridge=1e-2)
    assert grams == []  # handed over
    ref = refit_kept_columns(w, gram, kept, ridge=1e-2)
    torch.testing.assert_close(fitted, ref, rtol=1e-5, atol=1e-6)
    assert before == pytest.approx(relative_error(w, w[:, kept], gram, kept), rel=1e-9, abs=1e-15)
    assert after == pytest.approx(relative_error(w, ref, gram, kept), rel=1e-6, abs=1e-12)
    assert (after == 0.0) if every else (0.0 < after < before)
