"""Dense bit packing of unsigned integer codes (1 to 32 bits each).

Codes are laid out as one little-endian bit stream: code i occupies bits
[i*b, (i+1)*b) of the stream, so 3-bit codes straddle byte boundaries and a tensor of n
b-bit codes takes exactly ceil(n*b/8) bytes. Work is done in chunks so temporaries never exceed
a few MB regardless of the tensor size.

Codes of up to 8 bits (every quantized factor, the pruning masks) are packed eight at a time: eight
b-bit codes fill exactly b bytes, built as one 64-bit little-endian word, so no per-bit array is
ever made. Wider codes (pruning gaps) go through a bit stream.
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
    if bits < 8:
        return torch.from_numpy(_pack_words(flat.to(torch.uint8).numpy(), bits))
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
    if bits < 8:
        return torch.from_numpy(_unpack_words(data, bits, count))
    weights = (1 << np.arange(bits, dtype=np.int64)).astype(np.int64)
    out = np.empty(count, dtype=np.uint8 if bits <= 8 else np.int64)
    for start in range(0, count, CHUNK):
        n = min(CHUNK, count - start)
        offset = start * bits // 8
        stream = np.unpackbits(data[offset : offset + packed_nbytes(n, bits)], bitorder="little", count=n * bits)
        out[start : start + n] = stream.reshape(n, bits).astype(np.int64) @ weights
    return torch.from_numpy(out)


def _pack_words(codes: np.ndarray, bits: int) -> np.ndarray:
    """Eight codes of ``bits`` < 8 bits -> one uint64 word whose low ``bits`` bytes are the stream."""
    out = np.empty(packed_nbytes(codes.size, bits), dtype=np.uint8)
    shifts = np.arange(0, 8 * bits, bits, dtype=np.uint64)
    for start in range(0, codes.size, CHUNK):
        chunk = codes[start : start + CHUNK]
        padded = np.zeros(-(-chunk.size // 8) * 8, dtype=np.uint64)
        padded[: chunk.size] = chunk
        words = np.bitwise_or.reduce(padded.reshape(-1, 8) << shifts, axis=1)
        stream = words.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :bits].reshape(-1)
        offset = start * bits // 8
        end = min(out.size, offset + stream.size)
        out[offset:end] = stream[: end - offset]
    return out


def _unpack_words(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`_pack_words`: the first ``count`` codes, as uint8."""
    out = np.empty(count, dtype=np.uint8)
    shifts = np.arange(0, 8 * bits, bits, dtype=np.uint64)
    for start in range(0, count, CHUNK):
        n = min(CHUNK, count - start)
        groups = -(-n // 8)
        offset = start * bits // 8
        stored = data[offset : offset + min(groups * bits, packed_nbytes(n, bits))]
        padded = np.zeros(groups * bits, dtype=np.uint8)
        padded[: stored.size] = stored
        raw = np.zeros((groups, 8), dtype=np.uint8)
        raw[:, :bits] = padded.reshape(groups, bits)
        words = raw.view("<u8")  # (groups, 1)
        codes = (words >> shifts) & np.uint64((1 << bits) - 1)
        out[start : start + n] = codes.reshape(-1)[:n]
    return out


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be between 1 and 32, got {bits}")


class PackedStream:
    """``count`` codes packed as they arrive, into one buffer of ``packed_nbytes(count, bits)`` bytes:
    the bytes :func:`pack_codes` gives for all of them at once, without ever holding them all.

    Up to seven codes wait for the next call, so that every write starts on a byte boundary.
    """

    def __init__(self, count: int, bits: int) -> None:
        _check_bits(bits)
        self.count, self.bits = count, bits
        self.packed = torch.empty(packed_nbytes(count, bits), dtype=torch.uint8)
        self._written = 0
        self._waiting: torch.Tensor | None = None

    def add(self, codes: torch.Tensor) -> None:
        """Append ``codes`` (any shape, flattened in order)."""
        flat = codes.reshape(-1)
        if self._waiting is not None:
            flat = torch.cat([self._waiting.to(flat.dtype), flat])
        aligned = flat.numel() // 8 * 8
        self._write(flat[:aligned])
        self._waiting = flat[aligned:].clone() if aligned < flat.numel() else None

    def finish(self) -> torch.Tensor:
        """The packed bytes.

        Raises:
            ValueError: Fewer or more than ``count`` codes were added.
        """
        if self._waiting is not None:
            self._write(self._waiting)
            self._waiting = None
        if self._written != self.count:
            raise ValueError(f"{self._written} codes were packed where {self.count} were announced")
        return self.packed

    def _write(self, codes: torch.Tensor) -> None:
        if not codes.numel():
            return
        if self._written + codes.numel() > self.count:
            raise ValueError(f"more than the {self.count} codes announced")
        chunk = pack_codes(codes, self.bits)
        offset = self._written * self.bits // 8  # a multiple of 8 codes fill whole bytes
        self.packed[offset:offset + chunk.numel()] = chunk
        self._written += codes.numel()
