"""Dense bit packing of unsigned integer codes (1 to 32 bits each).

Codes are laid out as one little-endian bit stream: code i occupies bits
[i*b, (i+1)*b) of the stream, so 3-bit codes straddle byte boundaries and a tensor of n
b-bit codes takes exactly ceil(n*b/8) bytes. Work is done in chunks so the temporary
bit matrix never exceeds a few MB regardless of the tensor size.
"""

from __future__ import annotations

import numpy as np
import torch

CHUNK = 1 << 18  # codes per chunk (a multiple of 8 keeps chunks byte-aligned); <= 8 MB of temporaries


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes needed for ``count`` codes of ``bits`` bits."""
    return (count * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes into a flat uint8 tensor of ``packed_nbytes(codes.numel(), bits)`` bytes.

    Args:
        codes: Integer tensor of any shape with values in ``[0, 2**bits - 1]``.
        bits: Width of one code, 1 to 32.

    Raises:
        ValueError: ``bits`` is out of range or a code does not fit in it.
    """
    _check_bits(bits)
    flat = codes.detach().to("cpu").reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    if bits == 8:
        return flat.to(torch.uint8).clone()
    values = flat.to(torch.int64).numpy().astype(np.uint32)
    shifts = np.arange(bits, dtype=np.uint32)
    out = np.empty(packed_nbytes(values.size, bits), dtype=np.uint8)
    for start in range(0, values.size, CHUNK):
        chunk = values[start : start + CHUNK]
        stream = ((chunk[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
        packed = np.packbits(stream, bitorder="little")
        offset = start * bits // 8
        out[offset : offset + packed.size] = packed
    return torch.from_numpy(out)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``count`` codes as a flat tensor
    (uint8 for up to 8 bits, int64 above).

    Raises:
        ValueError: ``packed`` is too short for ``count`` codes.
    """
    _check_bits(bits)
    data = packed.detach().to("cpu").reshape(-1).to(torch.uint8).numpy()
    if data.size < packed_nbytes(count, bits):
        raise ValueError(f"{data.size} bytes cannot hold {count} codes of {bits} bits")
    if bits == 8:
        return torch.from_numpy(data[:count].copy())
    weights = (1 << np.arange(bits, dtype=np.int64)).astype(np.int64)
    out = np.empty(count, dtype=np.uint8 if bits <= 8 else np.int64)
    for start in range(0, count, CHUNK):
        n = min(CHUNK, count - start)
        offset = start * bits // 8
        stream = np.unpackbits(data[offset : offset + packed_nbytes(n, bits)], bitorder="little", count=n * bits)
        out[start : start + n] = stream.reshape(n, bits).astype(np.int64) @ weights
    return torch.from_numpy(out)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be between 1 and 32, got {bits}")
