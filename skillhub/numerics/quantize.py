"""Group-wise asymmetric integer quantization of matrices (the storage GPTQ also produces).

A matrix of shape (rows, cols) is split along its columns into groups of ``group_size``
(the last group may be shorter). Each (row, group) has a float16 scale and an integer
zero point in ``[0, 2**bits - 1]``; a value x is stored as the code
``clamp(round(x / scale) + zero, 0, 2**bits - 1)`` and read back as ``(code - zero) * scale``.

Error bound (documented, tested): for round-to-nearest every element is off by at most
one quantization step, ``|x - x_hat| <= scale`` of its group, and by at most half a step
unless it sits at the clamped edge of its group's range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from skillhub.numerics.bitpack import PackedStream, pack_codes, packed_nbytes, unpack_codes

QUANT_BITS = (2, 3, 4, 8)


def fit_scale_zero(values: torch.Tensor, bits: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min/max scale and integer zero point for each row of ``values`` (rows, k),
    at ``bits`` for every row or one width per row.

    The range always includes 0 (as in GPTQ): the zero point is an integer code in
    ``[0, 2**bits - 1]``, which can only express an offset if 0 lies inside the range. An
    all-zero group gets the range [-1, 1], as in the reference GPTQ quantizer. Scales stay
    float32 while codes are computed and are rounded to float16 only for storage, as in
    gptqmodel, so codes agree with it exactly.
    """
    maxq = (1 << bits) - 1 if isinstance(bits, int) else (2**bits - 1).to(values.dtype)
    vmin, vmax = values.amin(dim=-1), values.amax(dim=-1)
    low, high = vmin.clamp_max(0), vmax.clamp_min(0)
    empty = (low == 0) & (high == 0)
    low = torch.where(empty, -1.0, low)
    high = torch.where(empty, 1.0, high)
    scale = (high - low) / maxq
    # A nonzero constant group is stored as one code away from the zero point (scale = |c|
    # still spans a range that includes 0): exact whenever c is a float16 number.
    constant = (vmin == vmax) & ~empty
    scale = torch.where(constant, vmin.abs(), scale)
    scale = scale.clamp_min(torch.finfo(torch.float16).tiny)
    zero = torch.round(-low / scale).clamp_(min=0)
    return scale, zero.clamp_(max=maxq) if isinstance(maxq, int) else torch.minimum(zero, maxq)


def quantize_codes(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of ``values`` (..., k) under per-row ``scale``/``zero`` (...,)."""
    maxq = (1 << bits) - 1
    return torch.clamp(torch.round(values / scale[..., None]) + zero[..., None], 0, maxq)


@dataclass
class QuantizedMatrix:
    """Integer codes plus per-(row, group) scales and zero points."""

    codes: torch.Tensor  # (rows, cols) uint8
    scales: torch.Tensor  # (rows, groups) float16
    zeros: torch.Tensor  # (rows, groups) uint8
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the quantized matrix."""
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        """The float32 matrix the codes stand for."""
        rows, cols = self.shape
        group_of_col = torch.arange(cols) // self.group_size
        scales = self.scales.to(torch.float32)[:, group_of_col]
        zeros = self.zeros.to(torch.float32)[:, group_of_col]
        return (self.codes.to(torch.float32) - zeros) * scales

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(bit-packed codes, flat float16 scales, bit-packed zeros) for storage."""
        return (
            pack_codes(self.codes, self.bits),
            self.scales.reshape(-1).to(torch.float16),
            pack_codes(self.zeros, self.bits),
        )

    @classmethod
    def from_packed(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        *,
        rows: int,
        cols: int,
        bits: int,
        group_size: int,
    ) -> QuantizedMatrix:
        """Rebuild from the three tensors :meth:`packed` returned."""
        groups = num_groups(cols, group_size)
        return cls(
            codes=unpack_codes(codes, bits, rows * cols).reshape(rows, cols),
            scales=scales.reshape(rows, groups).to(torch.float16),
            zeros=unpack_codes(zeros, bits, rows * groups).reshape(rows, groups),
            bits=bits,
            group_size=group_size,
        )


def num_groups(cols: int, group_size: int) -> int:
    """Number of column groups of a matrix with ``cols`` columns."""
    return math.ceil(cols / group_size) if cols else 0


def packed_sizes(rows: int, cols: int, bits: int, group_size: int) -> tuple[int, int, int]:
    """Element counts of (packed code bytes, scales, packed zero bytes) of a (rows, cols) matrix."""
    groups = rows * num_groups(cols, group_size)
    return packed_nbytes(rows * cols, bits), groups, packed_nbytes(groups, bits)


def quantized_fields(rows: int, cols: int, bits: int, group_size: int, prefix: str = "") -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """dtype and shape of the three stored tensors of :meth:`QuantizedMatrix.packed` (for ``expected_fields``)."""
    code_bytes, scales, zero_bytes = packed_sizes(rows, cols, bits, group_size)
    return {f"{prefix}codes": (torch.uint8, (code_bytes,)), f"{prefix}scales": (torch.float16, (scales,)),
            f"{prefix}zeros": (torch.uint8, (zero_bytes,))}


def storage_bits(rows: int, cols: int, bits: int, group_size: int) -> int:
    """Bits a quantized (rows, cols) matrix takes on disk, scales and zero points included."""
    code_bytes, scales, zero_bytes = packed_sizes(rows, cols, bits, group_size)
    return 8 * (code_bytes + zero_bytes) + 16 * scales


def quantize_rtn(matrix: torch.Tensor, *, bits: int, group_size: int) -> QuantizedMatrix:
    """Round-to-nearest group-wise asymmetric quantization of a 2-D matrix.

    Args:
        matrix: (rows, cols) tensor.
        bits: One of 2, 3, 4, 8.
        group_size: Columns per group (clipped to ``cols``).
    """
    if bits not in QUANT_BITS:
        raise ValueError(f"bits must be one of {QUANT_BITS}, got {bits}")
    matrix = matrix.to(torch.float32)
    rows, cols = matrix.shape
    group_size = max(1, min(group_size, cols))
    groups = num_groups(cols, group_size)
    pad = groups * group_size - cols
    # Pad by repeating the last column so padding never widens a group's range.
    padded = torch.cat([matrix, matrix[:, -1:].expand(rows, pad)], dim=1) if pad else matrix
    blocks = padded.reshape(rows, groups, group_size)
    scale, zero = fit_scale_zero(blocks, bits)
    codes = quantize_codes(blocks, scale, zero, bits).reshape(rows, groups * group_size)[:, :cols]
    return QuantizedMatrix(
        codes=codes.to(torch.uint8),
        scales=scale.to(torch.float16),
        zeros=zero.to(torch.uint8),
        bits=bits,
        group_size=group_size,
    )


class StreamingQuantizer:
    """Round-to-nearest of one row of ``count`` values that arrive a piece at a time: the bytes of
    ``quantize_rtn(row, ...).packed()`` for the whole (1, count) row, and the squared error of their
    dequantization, holding about a million values at a time (a pruned 128k-vocabulary
    embedding keeps 262 million).
    """

    def __init__(self, count: int, *, bits: int, group_size: int, step: int = 1 << 20) -> None:
        if bits not in QUANT_BITS:
            raise ValueError(f"bits must be one of {QUANT_BITS}, got {bits}")
        self.bits = bits
        self.group_size = max(1, min(group_size, count))  # as quantize_rtn clips it to the row
        groups = num_groups(count, self.group_size)
        self._codes, self._zeros = PackedStream(count, bits), PackedStream(groups, bits)
        self._scales = torch.empty(groups, dtype=torch.float16)
        self._groups = 0
        self._step = self.group_size * max(1, step // self.group_size)  # whole groups at a time
        self._waiting = torch.empty(0)
        self.squared_error = 0.0

    def add(self, values: torch.Tensor) -> None:
        """Append ``values`` (flattened, in order)."""
        waiting = torch.cat([self._waiting, values.reshape(-1).to(torch.float32)])
        ready = waiting.numel() // self._step * self._step
        if ready:
            self._quantize(waiting[:ready])
        self._waiting = waiting[ready:].clone()

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(bit-packed codes, float16 scales, bit-packed zeros), as :meth:`QuantizedMatrix.packed`.

        Raises:
            ValueError: Fewer or more than ``count`` values were added.
        """
        if self._waiting.numel():
            # A last group shorter than group_size: quantize_rtn pads it with its last value, which
            # changes neither its minimum nor its maximum, so it quantizes the same on its own.
            self._quantize(self._waiting)
        return self._codes.finish(), self._scales, self._zeros.finish()

    def _quantize(self, values: torch.Tensor) -> None:
        quantized = quantize_rtn(values.reshape(1, -1), bits=self.bits, group_size=self.group_size)
        difference = values - quantized.dequantize().reshape(-1)
        self.squared_error += float(torch.linalg.vector_norm(difference, dtype=torch.float64)) ** 2
        self._codes.add(quantized.codes)
        self._zeros.add(quantized.zeros)
        groups = quantized.scales.numel()
        if self._groups + groups > self._scales.numel():
            raise ValueError("more values than the count announced")
        self._scales[self._groups:self._groups + groups] = quantized.scales.reshape(-1)
        self._groups += groups
