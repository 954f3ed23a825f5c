"""Tests for skillhub.numerics.bitpack: dense little-endian bit packing of 1- to 32-bit codes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from skillhub.numerics import bitpack
from skillhub.numerics.bitpack import pack_codes, packed_nbytes, unpack_codes

WIDTHS = [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 32]
# 0 and 1 are the degenerate cases; 7 and 13 leave partial bytes for most widths; the last
# length crosses the internal chunk size (and is not a multiple of 8).
LENGTHS = [0, 1, 7, 13, 1000, bitpack.CHUNK + 13]


def random_codes(count: int, bits: int, seed: int) -> torch.Tensor:
    """``count`` codes spanning the whole range [0, 2**bits - 1], both extremes included."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (count,), generator=gen, dtype=torch.int64)
    if count >= 2:
        codes[0] = 0
        codes[-1] = (1 << bits) - 1
    return codes


def reference_pack(codes: torch.Tensor, bits: int) -> bytes:
    """Little-endian bit stream built with Python integers: code i at bits [i*b, (i+1)*b)."""
    stream = 0
    for i, code in enumerate(codes.tolist()):
        stream |= int(code) << (i * bits)
    return stream.to_bytes(math.ceil(len(codes) * bits / 8), "little")


def test_chunk_size_is_what_the_long_length_assumes() -> None:
    assert LENGTHS[-1] > bitpack.CHUNK


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("count", LENGTHS)
def test_round_trip_is_exact(bits: int, count: int) -> None:
    codes = random_codes(count, bits, seed=bits * 1009 + count)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.dim() == 1
    assert packed.numel() == math.ceil(count * bits / 8) == packed_nbytes(count, bits)
    unpacked = unpack_codes(packed, bits, count)
    assert unpacked.dtype == (torch.uint8 if bits <= 8 else torch.int64)
    assert unpacked.shape == (count,)
    assert torch.equal(unpacked.to(torch.int64), codes)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("count", [1, 7, 13, 1000])
def test_layout_matches_reference_stream(bits: int, count: int) -> None:
    """The bytes themselves follow the documented layout, not just some invertible one."""
    codes = random_codes(count, bits, seed=7 * bits + count)
    assert bytes(pack_codes(codes, bits).numpy()) == reference_pack(codes, bits)


@pytest.mark.parametrize("bits", [1, 3, 5, 12, 32])
def test_layout_across_chunk_boundary(bits: int) -> None:
    """Chunked packing gives the same bytes as packing the whole stream at once."""
    count = bitpack.CHUNK + 13
    codes = random_codes(count, bits, seed=bits)
    values = codes.numpy().astype(np.uint64)
    stream = ((values[:, None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8).reshape(-1)
    expected = np.packbits(stream, bitorder="little")
    assert np.array_equal(pack_codes(codes, bits).numpy(), expected)


def test_three_bit_codes_straddle_bytes_little_endian() -> None:
    """[5, 3, 7] at 3 bits: stream bits (LSB first) 1 0 1 | 1 1 0 | 1 1 1.

    Byte 0 holds stream bits 0..7 = 1,0,1,1,1,0,1,1 -> 1+4+8+16+64+128 = 0xDD;
    byte 1 holds stream bit 8 = 1 -> 0x01. (Equivalently 5 | 3<<3 | 7<<6 = 0x1DD.)
    The second code straddles nothing, the third straddles the byte boundary.
    """
    packed = pack_codes(torch.tensor([5, 3, 7]), 3)
    assert packed.tolist() == [0xDD, 0x01]
    assert unpack_codes(packed, 3, 3).tolist() == [5, 3, 7]


def test_twelve_bit_codes_hand_computed() -> None:
    """0xABC | 0x123 << 12 = 0x123ABC -> little-endian bytes BC 3A 12."""
    packed = pack_codes(torch.tensor([0xABC, 0x123]), 12)
    assert packed.tolist() == [0xBC, 0x3A, 0x12]
    assert unpack_codes(packed, 12, 2).tolist() == [0xABC, 0x123]


def test_one_bit_codes_hand_computed() -> None:
    packed = pack_codes(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1)
    assert packed.tolist() == [0x81, 0x01]


def test_shape_is_flattened() -> None:
    codes = random_codes(24, 5, seed=3).reshape(2, 3, 4)
    packed = pack_codes(codes, 5)
    assert packed.numel() == 15
    assert torch.equal(unpack_codes(packed, 5, 24).to(torch.int64), codes.reshape(-1))


def test_unpack_reads_a_prefix() -> None:
    """Unpacking fewer codes than were packed returns exactly the leading codes."""
    codes = random_codes(100, 7, seed=11)
    assert torch.equal(unpack_codes(pack_codes(codes, 7), 7, 37).to(torch.int64), codes[:37])


@pytest.mark.parametrize("bits", [1, 3, 8, 12, 32])
def test_code_too_large_is_refused(bits: int) -> None:
    codes = torch.tensor([0, 1 << bits], dtype=torch.int64)
    with pytest.raises(ValueError):
        pack_codes(codes, bits)


@pytest.mark.parametrize("bits", [1, 4, 8, 16])
def test_negative_code_is_refused(bits: int) -> None:
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([0, -1]), bits)


@pytest.mark.parametrize("bits", [0, -1, 33, 64])
def test_bits_out_of_range_are_refused(bits: int) -> None:
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([0]), bits)
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(16, dtype=torch.uint8), bits, 1)


@pytest.mark.parametrize("bits,count", [(1, 9), (3, 3), (8, 5), (12, 3), (32, 2)])
def test_unpack_from_too_short_buffer_is_refused(bits: int, count: int) -> None:
    short = torch.zeros(packed_nbytes(count, bits) - 1, dtype=torch.uint8)
    with pytest.raises(ValueError):
        unpack_codes(short, bits, count)
