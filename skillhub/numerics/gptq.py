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

from dataclasses import dataclass

import torch

from skillhub.numerics.quantize import QUANT_BITS, QuantizedMatrix, fit_scale_zero, num_groups

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK_SIZE = 128


@dataclass(frozen=True)
class PreparedHessian:
    """What GPTQ derives from a Hessian before it quantizes anything, shared by every matrix
    quantized against the same inputs (the rank groups of one SVD): the inputs no sample
    reached, the column order, and the upper Cholesky factor of the damped inverse."""

    dead: torch.Tensor  # bool, per column: H_jj == 0
    perm: torch.Tensor | None  # column visiting order with act_order, else None
    inverse_cholesky: torch.Tensor


def prepare_hessian(hessian: torch.Tensor, *, damp: float = DEFAULT_DAMP, act_order: bool = False,
                    device: torch.device | None = None) -> PreparedHessian:
    """Steps 1-3 of the module docstring, raising damping until the factor exists.

    One working copy of the Hessian, factored and inverted in place (a 14336-wide float32
    Hessian is 822 MB: a copy per step would triple that).

    Raises:
        ValueError: No damping makes the Hessian positive definite.
    """
    device = hessian.device if device is None else device
    work = hessian.detach().to(device=device, dtype=torch.float32)
    diagonal = torch.diagonal(work)
    dead = diagonal == 0
    undamped = torch.where(dead, torch.ones_like(diagonal), diagonal)
    perm = torch.argsort(undamped, descending=True) if act_order else None
    if perm is not None:
        undamped = undamped[perm]
    mean_diag = torch.mean(undamped)
    info = torch.empty((), dtype=torch.int32, device=device)
    for attempt in range(6):
        work = hessian.detach().to(device=device, dtype=torch.float32, copy=True)
        work[dead, :] = 0
        work[:, dead] = 0
        if perm is not None:
            work = work[perm][:, perm]
        torch.diagonal(work).copy_(undamped + damp * (10**attempt) * mean_diag)
        torch.linalg.cholesky_ex(work, out=(work, info))  # in place: tested bit-identical to a copy
        if int(info) != 0:
            continue
        torch.cholesky_inverse(work, out=work)
        torch.linalg.cholesky_ex(work, upper=True, out=(work, info))
        if int(info) == 0:
            return PreparedHessian(dead=dead, perm=perm, inverse_cholesky=work)
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
    hessian: torch.Tensor | PreparedHessian,
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
        hessian: 2 X X^T of the calibration inputs the matrix multiplies (any positive scale), or
            what :func:`prepare_hessian` made of it (then ``act_order`` and ``damp`` are the
            prepared ones).
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
    W = weight.detach().to(torch.float32).clone()
    rows, cols = W.shape
    prepared = hessian if isinstance(hessian, PreparedHessian) else None
    size = prepared.inverse_cholesky.shape if prepared else hessian.shape
    if tuple(size) != (cols, cols):
        raise ValueError(f"Hessian of shape {tuple(size)} does not fit a matrix with {cols} columns")
    act_order = prepared.perm is not None if prepared else act_order
    if act_order and scale_axis == "column":
        raise ValueError("act_order needs scale_axis='row'")
    if prepared is None:
        prepared = prepare_hessian(hessian, damp=damp, act_order=act_order, device=W.device)
    W[:, prepared.dead.to(W.device)] = 0

    group_size = max(1, min(group_size, cols if scale_axis == "row" else rows))
    n_groups = num_groups(cols, group_size) if scale_axis == "row" else num_groups(rows, group_size)
    scale_rows, scale_cols = (rows, num_groups(cols, group_size)) if scale_axis == "row" else (cols, n_groups)
    scales = torch.zeros(scale_rows, scale_cols, device=W.device)
    zeros = torch.zeros(scale_rows, scale_cols, device=W.device)
    codes = torch.zeros(rows, cols, device=W.device)

    if act_order:
        for g in range(scale_cols):
            scales[:, g], zeros[:, g] = fit_scale_zero(W[:, g * group_size : (g + 1) * group_size], bits)
        perm = prepared.perm.to(W.device)
        W = W[:, perm]
    else:
        perm = torch.arange(cols, device=W.device)
    Hinv = prepared.inverse_cholesky.to(W.device)

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
