"""Truncated SVD and the byte count of SVD factors quantized in rank groups: kernels shared by
the SVD operators, budget mode and the benchmark."""

from __future__ import annotations

import torch

from skillhub.numerics.quantize import packed_sizes

# Below this rank / min(rows, cols), a randomized range finder beats a full SVD.
_RANDOMIZED_BELOW = 0.25
_OVERSAMPLE = 10
_POWER_ITERATIONS = 4


def truncated_svd(
    matrix: torch.Tensor, rank: int, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets (U: m x r, S: r, Vh: r x n) of a float32 matrix.

    Uses a randomized range finder with power iterations (Halko et al. 2011) when
    ``rank`` is well below min(m, n), a full SVD otherwise.
    """
    m, n = matrix.shape
    rank = min(rank, m, n)
    sketch = min(rank + _OVERSAMPLE, m, n)
    if sketch >= _RANDOMIZED_BELOW * min(m, n):
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    omega = torch.randn(n, sketch, generator=generator, device=matrix.device, dtype=matrix.dtype)
    q = torch.linalg.qr(matrix @ omega).Q
    for _ in range(_POWER_ITERATIONS):
        q = torch.linalg.qr(matrix.T @ q).Q
        q = torch.linalg.qr(matrix @ q).Q
    ub, s, vh = torch.linalg.svd(q.T @ matrix, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vh[:rank]


def svd_mixed_bytes(rows: int, cols: int, groups: list[tuple[int, int]], group_size: int) -> int:
    """Exact bytes ``svd-mixed`` stores for a (rows, cols) matrix with the given concrete rank groups."""
    total = 2 * sum(rank for rank, _ in groups)  # singular values in float16
    for rank, bits in groups:
        for length in (rows, cols):
            code_bytes, scales, zero_bytes = packed_sizes(rank, length, bits, group_size)
            total += code_bytes + 2 * scales + zero_bytes
    return total
