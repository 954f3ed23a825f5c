"""Truncated SVD and the byte count of SVD factors quantized in rank groups: kernels shared by
the SVD operators, budget mode and the benchmark."""

from __future__ import annotations

import torch

from skillhub.numerics.quantize import packed_sizes

_OVERSAMPLE = 10
_POWER_ITERATIONS = 4
# Seconds per unit of work, relative, fitted on CPU at 8B widths (bench/bench_scale.py): forming
# A^T A in float32 per big*small^2, its eigendecomposition per small^3, the randomized range
# finder's QRs per (big+small)*sketch^2 each.
_GRAM_COST, _EIGH_COST, _QR_COST = 0.85, 4.0, 4.0
# The randomized finder is within 1% where the Gram path is within 0.01%: take it only where the
# cost model says it saves at least half.
_RANDOMIZED_SAVING = 0.5
# The float32 Gram path is kept when the smallest kept eigenvalue is at least this share of the
# largest (see gram_svd).
_FLOAT32_ENOUGH = 1e-4
# Rows of the matrix converted to the Gram matrix's precision at a time while forming A^T A and
# A V: a float64 copy of an 8B MLP matrix alone would be 470 MB.
_BLOCK_ROWS = 2048


def truncated_svd(
    matrix: torch.Tensor, rank: int, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets (U: m x r, S: r, Vh: r x n) of a float32 matrix.

    Two exact-enough methods, the cheaper one for the shape and rank asked (a full SVD computes
    every triplet and costs 4.7x the Gram path on an 8B layer):

    - the eigendecomposition of the Gram matrix of the smaller side, in float32 where the spectrum
      allows and in float64 where squaring the singular values would lose what a float32
      reconstruction sees: reconstruction error within 0.01% of the exact truncated SVD's;
    - where a cost model says it takes at most half as long (low ranks of large matrices): a
      randomized range finder with power iterations (Halko et al. 2011), within 1%.

    Both are tested on slowly decaying, ill-conditioned and rank-deficient spectra.
    """
    m, n = matrix.shape
    rank = min(rank, m, n)
    if prefers_randomized(m, n, rank):
        return randomized_svd(matrix, rank, generator=generator)
    return gram_svd(matrix, rank)


def prefers_randomized(rows: int, cols: int, rank: int) -> bool:
    """Whether the randomized range finder is predicted to take at most half the Gram path's time."""
    big, small = max(rows, cols), min(rows, cols)
    sketch = min(rank + _OVERSAMPLE, small)
    randomized = _QR_COST * (2 * _POWER_ITERATIONS + 1) * (big + small) * sketch**2
    gram = _GRAM_COST * big * small**2 + _EIGH_COST * small**3
    return sketch < small and randomized <= _RANDOMIZED_SAVING * gram


def randomized_svd(
    matrix: torch.Tensor, rank: int, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets by a randomized range finder with power iterations."""
    m, n = matrix.shape
    rank = min(rank, m, n)
    sketch = min(rank + _OVERSAMPLE, m, n)
    omega = torch.randn(n, sketch, generator=generator, device=matrix.device, dtype=matrix.dtype)
    q = torch.linalg.qr(matrix @ omega).Q
    for _ in range(_POWER_ITERATIONS):
        q = torch.linalg.qr(matrix.T @ q).Q
        q = torch.linalg.qr(matrix @ q).Q
    ub, s, vh = torch.linalg.svd(q.T @ matrix, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vh[:rank]


def gram_svd(matrix: torch.Tensor, rank: int, *, precision: torch.dtype | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets from the eigendecomposition of A^T A (or A A^T, the smaller).

    float32 in and out. The Gram matrix squares the singular values, and float32 keeps about 7
    digits of them: enough when every kept singular value squared is at least 1e-4 of the largest
    (a fine-tune delta's slowly decaying spectrum: excess error ~1e-9), not for an ill-conditioned
    or rank-deficient one (~1e-4). By default (``precision`` None) float32 is tried and kept only
    in the first case; otherwise the work is redone in float64 (excess error ~1e-8 or less).
    Directions with a zero singular value get zero vectors on the other side.
    """
    if precision is None:
        factors, values = _gram_svd(matrix, rank, torch.float32)
        if values[-1] >= _FLOAT32_ENOUGH * values[0]:
            return factors
        precision = torch.float64
    return _gram_svd(matrix, rank, precision)[0]


def _gram_svd(matrix: torch.Tensor, rank: int, precision: torch.dtype
              ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The factors, and the kept eigenvalues (singular values squared, descending)."""
    wide = matrix.shape[0] < matrix.shape[1]
    tall = matrix.T if wide else matrix  # rows >= columns: the Gram matrix is columns x columns
    gram = torch.zeros(tall.shape[1], tall.shape[1], dtype=precision, device=matrix.device)
    for block in tall.split(_BLOCK_ROWS):
        block = block.to(precision)
        gram.addmm_(block.T, block)
    values, vectors = torch.linalg.eigh(gram)  # ascending
    values, vectors = values.flip(0)[:rank].clamp_min(0), vectors.flip(1)[:, :rank]
    s = values.sqrt()
    inverse = torch.where(s > 0, 1 / s, torch.zeros_like(s))
    other = torch.cat([(block.to(precision) @ vectors) * inverse for block in tall.split(_BLOCK_ROWS)])
    small, large, s = vectors.to(matrix.dtype), other.to(matrix.dtype), s.to(matrix.dtype)
    return ((small, s, large.T) if wide else (large, s, small.T)), values


def svd_mixed_bytes(rows: int, cols: int, groups: list[tuple[int, int]], group_size: int) -> int:
    """Exact bytes ``svd-mixed`` stores for a (rows, cols) matrix with the given concrete rank groups."""
    total = 2 * sum(rank for rank, _ in groups)  # singular values in float16
    for rank, bits in groups:
        for length in (rows, cols):
            code_bytes, scales, zero_bytes = packed_sizes(rank, length, bits, group_size)
            total += code_bytes + 2 * scales + zero_bytes
    return total
