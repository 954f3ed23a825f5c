"""The truncated SVD every SVD operator and budget mode use, against torch.linalg.svd: its
reconstruction error must be within the documented tolerance of the exact truncated SVD's, on
spectra like fine-tune deltas' (slowly decaying) and on ill-conditioned and rank-deficient ones."""

from __future__ import annotations

import pytest
import torch

from skillhub.numerics.svd import gram_svd, prefers_randomized, randomized_svd, truncated_svd

GRAM_TOLERANCE = 1e-4  # relative excess reconstruction error, Gram eigendecomposition
RANDOMIZED_TOLERANCE = 1e-2  # randomized range finder


def _matrix(rows: int, cols: int, spectrum: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=generator, dtype=torch.float64))
    index = torch.arange(1, k + 1, dtype=torch.float64)
    sigma = {
        "slow": index.pow(-0.5),  # a fine-tune delta's slowly decaying spectrum
        "ill-conditioned": torch.logspace(0, -12, k, dtype=torch.float64),
        "rank-deficient": torch.where(index <= k // 3, index.pow(-1.0), torch.zeros_like(index)),
    }[spectrum]
    return ((u * sigma) @ v.T).float() * 1e-3


def _excess_error(matrix: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rank: int) -> float:
    """(error of the factors - error of the exact truncated SVD) / ||matrix||."""
    u, s, vh = factors
    exact_s = torch.linalg.svdvals(matrix.double())
    best = float(exact_s[rank:].pow(2).sum().sqrt())
    got = float(torch.linalg.matrix_norm(matrix.double() - (u.double() * s.double()) @ vh.double()))
    return (got - best) / float(exact_s.pow(2).sum().sqrt())


@pytest.mark.parametrize("shape", [(600, 240), (240, 600), (400, 400)])
@pytest.mark.parametrize("spectrum", ["slow", "ill-conditioned", "rank-deficient"])
@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.9])
def test_reconstruction_within_tolerance_of_the_exact_truncated_svd(shape, spectrum, fraction) -> None:
    matrix = _matrix(*shape, spectrum)
    rank = max(1, round(fraction * min(shape)))
    gram = gram_svd(matrix, rank)  # float32 where the spectrum allows, else float64
    assert _excess_error(matrix, gram, rank) <= GRAM_TOLERANCE
    assert _excess_error(matrix, gram_svd(matrix, rank, precision=torch.float64), rank) <= GRAM_TOLERANCE
    randomized = randomized_svd(matrix, rank, generator=torch.Generator().manual_seed(1))
    assert _excess_error(matrix, randomized, rank) <= RANDOMIZED_TOLERANCE
    chosen = truncated_svd(matrix, rank, generator=torch.Generator().manual_seed(1))
    assert _excess_error(matrix, chosen, rank) <= (
        RANDOMIZED_TOLERANCE if prefers_randomized(*shape, rank) else GRAM_TOLERANCE)
    for u, s, vh in (gram, randomized, chosen):
        assert u.shape == (shape[0], rank) and s.shape == (rank,) and vh.shape == (rank, shape[1])
        assert u.dtype == s.dtype == vh.dtype == torch.float32
        assert torch.all(s[:-1] >= s[1:])  # descending


def test_singular_values_and_vectors_match_lapack_where_they_carry_energy() -> None:
    matrix = _matrix(500, 200, "slow")
    u, s, vh = gram_svd(matrix, 120)
    exact_u, exact_s, exact_vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    assert torch.allclose(s.double(), exact_s[:120], rtol=1e-5, atol=0)
    # Same subspaces: each vector equals LAPACK's up to sign (the spectrum has no repeated values).
    signs = torch.sign((vh.double() * exact_vh[:120]).sum(1))
    assert torch.allclose(vh.double() * signs[:, None], exact_vh[:120], atol=2e-4)
    assert torch.allclose(u.double() * signs, exact_u[:, :120], atol=2e-4)


def test_float32_is_kept_only_where_it_is_exact_enough() -> None:
    """On an ill-conditioned spectrum a float32 Gram matrix misses the exact truncation by ~1e-4;
    gram_svd notices and redoes the work in float64."""
    matrix = _matrix(600, 300, "ill-conditioned")
    in_float32 = gram_svd(matrix, 150, precision=torch.float32)
    assert _excess_error(matrix, in_float32, 150) > GRAM_TOLERANCE / 10  # what float32 alone gets
    assert _excess_error(matrix, gram_svd(matrix, 150), 150) < 1e-7


def test_zero_singular_values_give_zero_vectors_not_nan() -> None:
    matrix = torch.zeros(50, 20)
    matrix[:, 0] = 1.0
    u, s, vh = gram_svd(matrix, 5)
    assert torch.isfinite(u).all() and torch.isfinite(vh).all()
    assert torch.allclose((u * s) @ vh, matrix, atol=1e-6)


def test_the_cheaper_method_is_chosen_where_it_was_measured_cheaper() -> None:
    """bench_scale.py at 8B widths, float32 Gram against randomized: 3.0 s vs 3.2 s for a square 4096
    matrix at rank 1000, 4.5 s vs 12 s for 14336 x 4096 at 1400; Gram for small matrices, where its
    near-exactness costs nothing; randomized for low ranks of large matrices."""
    assert not prefers_randomized(4096, 4096, 1000)
    assert not prefers_randomized(14336, 4096, 1400) and not prefers_randomized(4096, 14336, 1400)
    assert not prefers_randomized(1024, 4096, 250) and not prefers_randomized(128, 384, 44)
    assert prefers_randomized(14336, 4096, 64)  # low ranks of large matrices
