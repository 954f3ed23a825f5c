"""GPTQ (Frantar et al. 2022): quantize a matrix column by column, pushing each column's
rounding error onto the columns not yet quantized, weighted by the Hessian of the layer input,
so that ||W x - W^ x|| stays small for the calibration inputs x.

Given W (rows x cols) and H = 2 X X^T (cols x cols) of the inputs X it multiplies:

1. dead inputs (H_jj = 0) are dropped (W[:, j] = 0, H_jj = 1);
2. H is damped by ``damp * mean(diag H)`` (more if Cholesky still fails);
3. one Cholesky factorization H = R R^T with R *upper* triangular, i.e. H = A D A^T with
   A = R diag(R)^-1 unit upper triangular;
4. columns are visited in order, and column j is rounded from X_j = W_j + sum_{i<j} (W_i - Q_i) A_ij:
   the original weights plus the rounding errors so far, weighted by A. This is the LDL form of
   GPTQ (Chee et al. 2023, "QuIP", which shows it equivalent to OPTQ: the same X_j, hence the
   same codes, as GPTQ's updates along the rows of chol(H^-1)), and it needs no inverse of H: one
   n^3/3 factorization where the factor of H^-1 takes at best 2n^3/3 (a Cholesky and a triangular
   inverse), 1.0 TFLOP less per layer at an 8B model's 14336-wide MLP. Columns are processed in
   blocks of ``block_size``: a block starts from the errors of every earlier block by one matrix
   product, then each column's error reaches the block's later columns by a rank-one update.

Scales and zero points are asymmetric min/max over groups, with the range always including
0 (:func:`skillhub.numerics.quantize.fit_scale_zero`). Two layouts:

- ``scale_axis="row"`` (the usual one): groups of ``group_size`` consecutive columns per row;
  a group's scale is fitted when its first column is reached, from GPTQ's weights as the blocks
  before it left them (the reference algorithm's choice). In LDL form those are
  W_F + (X_F - W_F) A_FF^-1 over the block's columns F: a small triangular solve per block.
  With ``act_order`` columns are visited by decreasing H_jj, and group scales are fitted up front
  ("static groups") so the stored layout stays contiguous.
- ``scale_axis="column"``: each column gets its own scales over groups of ``group_size`` rows,
  fitted when the column is quantized. Used for the U factor of an SVD (paper Eq. 8), whose
  columns are singular directions: the result is stored as the quantized transpose, the same
  per-singular-vector layout round-to-nearest uses.

With H = I no error is propagated and the result equals round-to-nearest exactly; the codes are
those of GPTQ's Algorithm 1 (tests/test_gptq.py) and of gptqmodel (tests/test_gptq_oracle.py).
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
    reached, the column order, and the upper Cholesky factor R of the damped Hessian (R R^T = H).

    R is kept as ``reversed_factor`` L = R reversed along both axes, the lower Cholesky factor of
    H reversed: J H J = L L^T gives H = (J L J)(J L^T J) with J L J upper triangular. One Cholesky
    in place (n^3/3 flops, one n x n buffer), where GPTQ's usual form takes a Cholesky and an
    inverse.

    L fills the lower triangle of its buffer; the strictly upper triangle still holds the
    (reordered) Hessian's, which the factorization never touches, and ``diagonal`` its diagonal.
    So one n x n buffer holds both the factor and the undamped Hessian: :meth:`quadratic_form`
    gives the U-side Hessian of Eq. 8 without a second copy of H, and a failed factorization is
    retried from that triangle.
    """

    dead: torch.Tensor  # bool, per column: H_jj == 0
    perm: torch.Tensor | None  # column visiting order with act_order, else None
    reversed_factor: torch.Tensor  # L, lower triangular: R[i, j] = L[n-1-i, n-1-j]
    diagonal: torch.Tensor  # H's diagonal in the buffer's order (reversed, after ``perm``)

    def unit_columns(self, start: int, stop: int) -> torch.Tensor:
        """A[:stop, start:stop] for A = R diag(R)^-1 (unit upper triangular, zero below its
        diagonal): the weights of every earlier column's error in one block of columns."""
        n = self.reversed_factor.shape[0]
        columns = self.reversed_factor[n - stop:, n - stop:n - start].flip(0, 1)  # R[:stop, start:stop], a copy
        square = columns[start:]
        square.copy_(square.triu())  # below R's diagonal the buffer holds the Hessian
        return columns.div_(torch.diagonal(square).clone())

    def quadratic_form(self, projection: torch.Tensor, block: int = 1024) -> torch.Tensor:
        """P H P^T for P (k x n), H the undamped Hessian, read from the buffer's strictly upper
        triangle a block of columns at a time (n x block extra, not n x n).

        With K = J' H J' (J' the buffer's column order) held as S + S^T + D (S strictly upper):
        P H P^T = Q K Q^T = A + A^T + Q D Q^T with Q = P J' and A = Q S Q^T.
        """
        buffer = self.reversed_factor
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
        if _factor(work):
            return PreparedHessian(dead=dead, perm=perm, reversed_factor=work, diagonal=diagonal[order])
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


def _factor(work: torch.Tensor) -> bool:
    """Overwrite the lower triangle (with the diagonal) of the symmetric ``work`` = A with L,
    A = L L^T, leaving its strictly upper triangle as it was; False if A is not positive definite.

    On the CPU, LAPACK's potrf through SciPy works in place on the buffer (torch's Cholesky copies
    a row-major input to column-major first: 822 MB more at 14336 wide); elsewhere, torch's.
    """
    if work.device.type != "cpu":
        lower, info = torch.linalg.cholesky_ex(work)
        if int(info) != 0:
            return False
        work.triu_(1).add_(lower.tril_())
        return True
    from scipy.linalg import lapack

    # Row-major A is column-major A^T = A: its upper factor U (U^T U = A) is, read row-major, the
    # lower L = U^T. LAPACK never references the other triangle (clean=0 keeps SciPy from zeroing it).
    _, info = lapack.spotrf(work.numpy().T, lower=0, clean=0, overwrite_a=1)
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
    size = prepared.reversed_factor.shape if prepared else hessian.shape
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
    Wt = W.T.contiguous()  # rows before the current block: their errors W - Q; the rest: W as given
    del W

    maxq = (1 << bits) - 1 if isinstance(bits, int) else (2**bits - 1).to(Wt.dtype)
    order = perm.tolist()
    fits_groups = scale_axis == "row" and not act_order
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        group_starts = [c for c in range(i1, i2) if c % group_size == 0] if fits_groups else []
        stop = min(cols, max(i2, group_starts[-1] + group_size)) if group_starts else i2
        A = prepared.unit_columns(i1, stop).to(Wt.device)  # A[:stop, i1:stop]
        feedback = A[:i1].T @ Wt[:i1]  # every earlier block's errors, weighted: X - W on columns i1:stop
        if group_starts:  # GPTQ's weights as the earlier blocks left them, W + (X - W) A^-1 here
            updated = Wt[i1:stop] + torch.linalg.solve_triangular(A[i1:].T, feedback, upper=False, unitriangular=True)
        block = Wt[i1:i2] + feedback[: i2 - i1]
        within = A[i1:i2, : i2 - i1]
        block_codes = torch.empty_like(block)
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
                if fits_groups and column % group_size == 0:
                    scales[:, group], zeros[:, group] = fit_scale_zero(updated[i : i + group_size].T, bits)
                scale, zero = scales[:, group], zeros[:, group]
            q = torch.round(w / scale).add_(zero).clamp_(min=0)
            q = q.clamp_(max=maxq) if isinstance(maxq, int) else torch.minimum(q, maxq, out=q)
            block_codes[i] = q
            error = Wt[i1 + i].sub_((q - zero) * scale)  # W - Q, in place of W
            block[i + 1:].addr_(within[i, i + 1:], error)
        codes[perm[i1:i2] if act_order else slice(i1, i2)] = block_codes
    return codes, scales, zeros


def output_error(weight: torch.Tensor, approximation: torch.Tensor, hessian: torch.Tensor) -> float:
    """sqrt(tr(E H E^T)) with E = weight - approximation: ||E X||_F up to the Hessian's scale."""
    error = (weight - approximation).to(torch.float64)
    return float(torch.sqrt(torch.clamp(torch.einsum("ij,jk,ik->", error, hessian.to(torch.float64), error), min=0)))
