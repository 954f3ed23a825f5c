"""GPTQ (Frantar et al. 2022): quantize a matrix column by column, pushing each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
layer input, so that ||W x - W^ x|| stays small for the calibration inputs x.

Given W (rows x cols) and H = 2 X X^T (cols x cols) of the inputs X it multiplies:

1. dead inputs (H_jj = 0) are dropped (W[:, j] = 0, H_jj = 1);
2. H is damped by ``damp * mean(diag H)`` (more if Cholesky still fails);
3. U = chol(H^-1, upper) gives, row by row, the error-propagation coefficients;
4. columns are processed in blocks of ``block_size``: within a block, each quantized column's
   error ``(w - q) / U_jj`` is subtracted from the block's later columns; after the block the
   accumulated errors are pushed onto every later column with one matmul.

Scales and zero points are asymmetric min/max over groups, with the range always including
0 (:func:`skillhub.numerics.quantize.fit_scale_zero`). Two layouts:

- ``scale_axis="row"`` (the usual one): groups of ``group_size`` consecutive columns per row;
  a group's scale is fitted when its first column is reached, from the weights as updated so
  far. With ``act_order`` columns are visited by decreasing H_jj, and group scales are fitted
  up front ("static groups") so the stored layout stays contiguous.
- ``scale_axis="column"``: each column gets its own scales over groups of ``group_size`` rows,
  fitted when the column is quantized. Used for the U factor of an SVD (paper Eq. 8), whose
  columns are singular directions: the result is stored as the quantized transpose, the same
  per-singular-vector layout round-to-nearest uses.

With H = I no error is propagated and the result equals round-to-nearest exactly (tested).
"""

from __future__ import annotations

import torch

from skillhub.numerics.quantize import QUANT_BITS, QuantizedMatrix, fit_scale_zero, num_groups

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK_SIZE = 128


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse Hessian, raising damping until it exists.

    Damps ``hessian`` in place (the caller owns the copy): a 4096-wide Hessian is 64 MB.
    """
    diagonal = torch.arange(hessian.shape[0], device=hessian.device)
    undamped = torch.diag(hessian).clone()
    mean_diag = torch.mean(undamped)
    for attempt in range(6):
        hessian[diagonal, diagonal] = undamped + damp * (10**attempt) * mean_diag
        lower, info = torch.linalg.cholesky_ex(hessian)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError("the calibration Hessian is not positive definite even with heavy damping")


def _fit_column(column: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points of one column over groups of ``group_size`` rows (expanded per row)."""
    rows = column.shape[0]
    groups = num_groups(rows, group_size)
    pad = groups * group_size - rows
    padded = torch.cat([column, column[-1:].expand(pad)]) if pad else column
    scale, zero = fit_scale_zero(padded.reshape(groups, group_size), bits)
    return scale, zero


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    scale_axis: str = "row",
    act_order: bool = False,
    damp: float = DEFAULT_DAMP,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> QuantizedMatrix:
    """Quantize ``weight`` (rows x cols) against the input Hessian ``hessian`` (cols x cols).

    Args:
        weight: The matrix to quantize.
        hessian: 2 X X^T of the calibration inputs the matrix multiplies (any positive scale).
        bits: 2, 3, 4 or 8.
        group_size: Entries per scale group (along columns for ``row``, along rows for ``column``).
        scale_axis: ``"row"`` or ``"column"``, see the module docstring.
        act_order: Visit columns by decreasing Hessian diagonal (``row`` layout only).
        damp: Fraction of the mean Hessian diagonal added to the diagonal.
        block_size: Columns per lazy-update block.

    Returns:
        The quantized matrix: of ``weight`` for ``row``, of ``weight.T`` for ``column``.

    Raises:
        ValueError: Bad arguments, or a Hessian that no damping makes positive definite.
    """
    if bits not in QUANT_BITS:
        raise ValueError(f"bits must be one of {QUANT_BITS}, got {bits}")
    if scale_axis not in ("row", "column"):
        raise ValueError(f"scale_axis must be 'row' or 'column', got {scale_axis!r}")
    if act_order and scale_axis == "column":
        raise ValueError("act_order needs scale_axis='row'")
    W = weight.detach().to(torch.float32).clone()
    rows, cols = W.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian of shape {tuple(hessian.shape)} does not fit a matrix with {cols} columns")
    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    group_size = max(1, min(group_size, cols if scale_axis == "row" else rows))
    n_groups = num_groups(cols, group_size) if scale_axis == "row" else num_groups(rows, group_size)
    scale_rows, scale_cols = (rows, num_groups(cols, group_size)) if scale_axis == "row" else (cols, n_groups)
    scales = torch.zeros(scale_rows, scale_cols, device=W.device)
    zeros = torch.zeros(scale_rows, scale_cols, device=W.device)
    codes = torch.zeros(rows, cols, device=W.device)

    if act_order:
        for g in range(scale_cols):
            scales[:, g], zeros[:, g] = fit_scale_zero(W[:, g * group_size : (g + 1) * group_size], bits)
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    else:
        perm = torch.arange(cols, device=W.device)
    Hinv = _inverse_cholesky(H, damp)

    maxq = (1 << bits) - 1
    order = perm.tolist()
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        block_codes = torch.empty_like(W1)
        errors = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = order[i1 + i]
            w = W1[:, i]
            if scale_axis == "column":
                scale, zero = _fit_column(w, bits, group_size)
                scales[column], zeros[column] = scale, zero
                scale = scale.repeat_interleave(group_size)[:rows]
                zero = zero.repeat_interleave(group_size)[:rows]
            else:
                group = column // group_size
                if not act_order and column % group_size == 0:
                    # Fitted from W as updated by earlier blocks (the reference algorithm's choice).
                    start = i1 + i
                    scales[:, group], zeros[:, group] = fit_scale_zero(W[:, start : start + group_size], bits)
                scale, zero = scales[:, group], zeros[:, group]
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            block_codes[:, i] = q
            error = (w - (q - zero) * scale) / Hinv1[i, i]
            W1[:, i:].addr_(error, Hinv1[i, i:], alpha=-1)
            errors[:, i] = error
        codes[:, perm[i1:i2] if act_order else slice(i1, i2)] = block_codes
        W[:, i2:] -= errors @ Hinv[i1:i2, i2:]

    if scale_axis == "column":
        return QuantizedMatrix(codes=codes.T.to(torch.uint8).contiguous().cpu(), scales=scales.to(torch.float16).cpu(),
                               zeros=zeros.to(torch.uint8).cpu(), bits=bits, group_size=group_size)
    return QuantizedMatrix(codes=codes.to(torch.uint8).cpu(), scales=scales.to(torch.float16).cpu(),
                           zeros=zeros.to(torch.uint8).cpu(), bits=bits, group_size=group_size)


def output_error(weight: torch.Tensor, approximation: torch.Tensor, hessian: torch.Tensor) -> float:
    """sqrt(tr(E H E^T)) with E = weight - approximation: ||E X||_F up to the Hessian's scale."""
    error = (weight - approximation).to(torch.float64)
    return float(torch.sqrt(torch.clamp(torch.einsum("ij,jk,ik->", error, hessian.to(torch.float64), error), min=0)))
