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
    reached, the column order, and the upper Cholesky factor R of the damped inverse (R^T R = H^-1).

    R is kept as ``reversed_inverse`` M = R reversed along both axes, the inverse of the lower
    Cholesky factor of H reversed: J H J = L L^T gives H^-1 = (J L^-T J)(J L^-1 J) with J L^-1 J
    upper triangular. That costs one Cholesky and one in-place triangular inverse (2n^3/3 flops,
    one n x n buffer) instead of Cholesky, inverse and Cholesky again (4n^3/3); measured 2.5x
    faster at n = 4096 on CPU.

    M fills the lower triangle of its buffer; the strictly upper triangle still holds the
    (reordered) Hessian's, which the factorization never touches, and ``diagonal`` its diagonal.
    So one n x n buffer holds both the factor and the undamped Hessian: :meth:`quadratic_form`
    gives the U-side Hessian of Eq. 8 without a second copy of H, and a failed factorization is
    retried from that triangle.
    """

    dead: torch.Tensor  # bool, per column: H_jj == 0
    perm: torch.Tensor | None  # column visiting order with act_order, else None
    reversed_inverse: torch.Tensor  # M, lower triangular: R[i, j] = M[n-1-i, n-1-j]
    diagonal: torch.Tensor  # H's diagonal in the buffer's order (reversed, after ``perm``)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """R[start:stop, start:]: the rows GPTQ needs for one block of columns."""
        n = self.reversed_inverse.shape[0]
        return self.reversed_inverse[n - stop:n - start, :n - start].flip(0, 1)

    def quadratic_form(self, projection: torch.Tensor, block: int = 1024) -> torch.Tensor:
        """P H P^T for P (k x n), H the undamped Hessian, read from the buffer's strictly upper
        triangle a block of columns at a time (n x block extra, not n x n).

        With K = J' H J' (J' the buffer's column order) held as S + S^T + D (S strictly upper):
        P H P^T = Q K Q^T = A + A^T + Q D Q^T with Q = P J' and A = Q S Q^T.
        """
        buffer = self.reversed_inverse
        n = buffer.shape[0]
        order = (self.perm if self.perm is not None else torch.arange(n, device=buffer.device)).flip(0)
        q = projection.to(buffer.device, buffer.dtype)[:, order]
        qs = torch.empty_like(q)
        for start in range(0, n, block):
            stop = min(start + block, n)
            columns = buffer[:stop, start:stop].triu(1 - start)  # S[:stop, start:stop]: rows above the diagonal
            torch.mm(q[:, :stop], columns, out=qs[:, start:stop])
        half = qs @ q.T
        return half + half.T + (q * self.diagonal) @ q.T


def prepare_hessian(hessian: torch.Tensor, *, damp: float = DEFAULT_DAMP, act_order: bool = False,
                    device: torch.device | None = None, overwrite: bool = False) -> PreparedHessian:
    """Steps 1-3 of the module docstring, raising damping until the factor exists.

    One n x n buffer (a 14336-wide float32 Hessian is 822 MB): a copy of ``hessian``, or with
    ``overwrite`` (the caller's Hessian is read by nothing else) ``hessian``'s own storage where it
    is float32, contiguous and on ``device``, so that H and its factor are never held twice.

    Raises:
        ValueError: No damping makes the Hessian positive definite.
    """
    device = hessian.device if device is None else device
    diagonal = torch.diagonal(hessian).to(device=device, dtype=torch.float32, copy=True)  # not a view: H may be overwritten
    dead = diagonal == 0
    undamped = torch.where(dead, torch.ones_like(diagonal), diagonal)
    perm = torch.argsort(undamped, descending=True) if act_order else None
    order = (perm if perm is not None else torch.arange(len(diagonal), device=device)).flip(0)  # J: reversed
    in_place = (overwrite and perm is None and hessian.device == device and hessian.dtype == torch.float32
                and hessian.is_contiguous())
    if in_place:
        work = hessian.detach()
        _reverse_in_place(work.view(-1))  # J H J: the flat buffer reversed
    else:
        work = hessian.detach().to(device=device, dtype=torch.float32)
        work = work.flip(0, 1) if perm is None else work[order][:, order]  # a fresh copy: J H J
    reversed_dead = dead[order]
    work[reversed_dead, :] = 0
    work[:, reversed_dead] = 0
    mean_diag = torch.mean(undamped)
    for attempt in range(6):
        if attempt:  # the failed factorization overwrote the lower triangle: rebuild it from the upper one
            mirror_lower(work.T)
        torch.diagonal(work).copy_(undamped[order] + damp * (10**attempt) * mean_diag)
        if _factor_and_invert(work):
            return PreparedHessian(dead=dead, perm=perm, reversed_inverse=work, diagonal=diagonal[order])
    raise ValueError("the calibration Hessian is not positive definite even with heavy damping")


def _reverse_in_place(flat: torch.Tensor, chunk: int = 1 << 22) -> None:
    """Reverse a 1-D tensor in place, swapping its two ends a chunk at a time."""
    size = flat.numel()
    half = size // 2
    for start in range(0, half, chunk):
        stop = min(start + chunk, half)
        front, back = flat[start:stop], flat[size - stop:size - start]
        saved = front.clone()
        front.copy_(back.flip(0))
        back.copy_(saved.flip(0))


def mirror_lower(matrix: torch.Tensor, block: int = 1024) -> None:
    """Copy the strictly lower triangle onto the upper one, in place, a block of rows at a time
    (on ``matrix.T``: the upper onto the lower)."""
    n = matrix.shape[0]
    for start in range(0, n, block):
        stop = min(start + block, n)
        square = matrix[start:stop, start:stop]
        square.copy_(square.tril() + square.tril(-1).T)
        matrix[start:stop, stop:] = matrix[stop:, start:stop].T


def _factor_and_invert(work: torch.Tensor) -> bool:
    """Overwrite the lower triangle (with the diagonal) of the symmetric ``work`` = A with L^-1,
    A = L L^T, leaving its strictly upper triangle as it was; False if A is not positive definite.

    On the CPU, LAPACK's potrf and trtri through SciPy work in place on the buffer (torch's
    Cholesky copies a row-major input to column-major first: 822 MB more at 14336 wide, and it has
    no triangular inverse); elsewhere, torch's Cholesky and a triangular solve.
    """
    if work.device.type != "cpu":
        lower, info = torch.linalg.cholesky_ex(work)
        if int(info) != 0:
            return False
        inverse = torch.linalg.solve_triangular(lower, torch.eye(len(work), device=work.device), upper=False)
        work.triu_(1).add_(inverse.tril_())
        return True
    from scipy.linalg import lapack

    # Row-major A is column-major A^T = A: its upper factor U (U^T U = A) is, read row-major,
    # the lower L = U^T; then U^-1 read row-major is (U^-1)^T = L^-1. LAPACK never references the
    # other triangle (clean=0 keeps SciPy from zeroing it).
    column_major = work.numpy().T
    _, info = lapack.spotrf(column_major, lower=0, clean=0, overwrite_a=1)
    if info != 0:
        return False
    _, info = lapack.strtri(column_major, lower=0, overwrite_c=1)
    return info == 0


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
    if scale_axis not in ("row", "column"):
        raise ValueError(f"scale_axis must be 'row' or 'column', got {scale_axis!r}")
    if scale_axis == "row":
        return gptq_quantize_stacked(weight, hessian, parts=[(weight.shape[0], bits)], group_size=group_size,
                                     act_order=act_order, damp=damp, block_size=block_size)[0]
    _check_bits(bits)
    if act_order or (isinstance(hessian, PreparedHessian) and hessian.perm is not None):
        raise ValueError("act_order needs scale_axis='row'")
    W, prepared = _setup(weight, hessian, act_order=False, damp=damp)
    codes, scales, zeros = _quantize_columns(W, prepared, bits, max(1, min(group_size, W.shape[0])), "column",
                                             block_size)
    return QuantizedMatrix(codes=codes.to(torch.uint8).cpu(), scales=scales.to(torch.float16).cpu(),
                           zeros=zeros.to(torch.uint8).cpu(), bits=bits, group_size=max(1, min(group_size, W.shape[0])))


def gptq_quantize_stacked(
    weight: torch.Tensor,
    hessian: torch.Tensor | PreparedHessian,
    *,
    parts: list[tuple[int, int]],
    group_size: int,
    act_order: bool = False,
    damp: float = DEFAULT_DAMP,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> list[QuantizedMatrix]:
    """Quantize matrices stacked along their rows that multiply the same inputs, each at its own
    bit width (``parts``: ``[(rows, bits), ...]`` from the top): the rank groups of V^T in one SVD.

    GPTQ treats rows independently, so this is quantizing each part alone (``row`` layout, same
    arguments as :func:`gptq_quantize`; tested), in one pass over the columns instead of one per
    part: the pass is a Python loop over columns, so its cost is per column, not per row.
    """
    for _, bits in parts:
        _check_bits(bits)
    if sum(rows for rows, _ in parts) != weight.shape[0]:
        raise ValueError(f"parts of {sum(rows for rows, _ in parts)} rows do not stack to {weight.shape[0]}")
    W, prepared = _setup(weight, hessian, act_order=act_order, damp=damp)
    widths = torch.cat([torch.full((rows,), bits) for rows, bits in parts]).to(W.device)
    group_size = max(1, min(group_size, W.shape[1]))
    codes, scales, zeros = _quantize_columns(W, prepared, widths if len(parts) > 1 else parts[0][1], group_size,
                                             "row", block_size)
    codes = codes.T
    quantized, start = [], 0
    for rows, bits in parts:
        block = slice(start, start + rows)
        quantized.append(QuantizedMatrix(codes=codes[block].to(torch.uint8).cpu(),
                                         scales=scales[block].to(torch.float16).cpu(),
                                         zeros=zeros[block].to(torch.uint8).cpu(), bits=bits, group_size=group_size))
        start += rows
    return quantized


def _check_bits(bits: int) -> None:
    if bits not in QUANT_BITS:
        raise ValueError(f"bits must be one of {QUANT_BITS}, got {bits}")


def _setup(weight: torch.Tensor, hessian: torch.Tensor | PreparedHessian, *, act_order: bool, damp: float
           ) -> tuple[torch.Tensor, PreparedHessian]:
    """The working copy of ``weight`` (dead inputs zeroed) and the prepared Hessian."""
    W = weight.detach().to(torch.float32).clone()
    cols = W.shape[1]
    prepared = hessian if isinstance(hessian, PreparedHessian) else None
    size = prepared.reversed_inverse.shape if prepared else hessian.shape
    if tuple(size) != (cols, cols):
        raise ValueError(f"Hessian of shape {tuple(size)} does not fit a matrix with {cols} columns")
    if prepared is None:
        prepared = prepare_hessian(hessian, damp=damp, act_order=act_order, device=W.device)
    W[:, prepared.dead.to(W.device)] = 0
    return W, prepared


def _quantize_columns(W: torch.Tensor, prepared: PreparedHessian, bits: int | torch.Tensor, group_size: int,
                      scale_axis: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 4 of the module docstring: (codes transposed, i.e. cols x rows, scales, zeros) as float
    tensors. ``bits`` may be one width per row (``row`` layout).

    The work is done on W^T, so that each column GPTQ visits is a contiguous row in memory: a
    column of a 14336-row U factor read with a stride was most of the time spent here.
    """
    rows, cols = W.shape
    act_order = prepared.perm is not None
    n_groups = num_groups(cols, group_size) if scale_axis == "row" else num_groups(rows, group_size)
    scale_rows, scale_cols = (rows, n_groups) if scale_axis == "row" else (cols, n_groups)
    scales = torch.zeros(scale_rows, scale_cols, device=W.device)
    zeros = torch.zeros(scale_rows, scale_cols, device=W.device)
    codes = torch.zeros(cols, rows, device=W.device)  # transposed, like the work

    if act_order:
        for g in range(scale_cols):
            scales[:, g], zeros[:, g] = fit_scale_zero(W[:, g * group_size : (g + 1) * group_size], bits)
        perm = prepared.perm.to(W.device)
        W = W[:, perm]
    else:
        perm = torch.arange(cols, device=W.device)
    Wt = W.T.contiguous()
    del W

    maxq = (1 << bits) - 1 if isinstance(bits, int) else (2**bits - 1).to(Wt.dtype)
    order = perm.tolist()
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        block = Wt[i1:i2].clone()
        block_codes = torch.empty_like(block)
        errors = torch.empty_like(block)
        R = prepared.rows(i1, i2).to(Wt.device)  # R[i1:i2, i1:]
        Hinv1 = R[:, : i2 - i1]
        for i in range(i2 - i1):
            column = order[i1 + i]
            w = block[i]
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
                    scales[:, group], zeros[:, group] = fit_scale_zero(Wt[start : start + group_size].T, bits)
                scale, zero = scales[:, group], zeros[:, group]
            q = torch.round(w / scale).add_(zero).clamp_(min=0)
            q = q.clamp_(max=maxq) if isinstance(maxq, int) else torch.minimum(q, maxq, out=q)
            block_codes[i] = q
            error = (w - (q - zero) * scale) / Hinv1[i, i]
            block[i:].addr_(Hinv1[i, i:], error, alpha=-1)
            errors[i] = error
        codes[perm[i1:i2] if act_order else slice(i1, i2)] = block_codes
        Wt[i2:] -= R[:, i2 - i1 :].T @ errors
    return codes, scales, zeros


def output_error(weight: torch.Tensor, approximation: torch.Tensor, hessian: torch.Tensor) -> float:
    """sqrt(tr(E H E^T)) with E = weight - approximation: ||E X||_F up to the Hessian's scale."""
    error = (weight - approximation).to(torch.float64)
    return float(torch.sqrt(torch.clamp(torch.einsum("ij,jk,ik->", error, hessian.to(torch.float64), error), min=0)))
