"""Tests for skillhub.numerics.quantize: group-wise asymmetric round-to-nearest quantization.

The documented bound: every element is off by at most one quantization step (its group's
scale), and by at most half a step unless it sits at the clamped edge of its group's range.
"""

from __future__ import annotations

import math

import pytest
import torch

from skillhub.numerics.quantize import (
    QUANT_BITS,
    QuantizedMatrix,
    num_groups,
    packed_sizes,
    quantize_rtn,
    storage_bits,
)

ROWS, COLS = 48, 100
# 20 divides 100; 32 leaves a last group of 4 columns; 128 is wider than the matrix (clipped).
GROUP_SIZES = [20, 32, 128]


def gaussian(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen) * 0.02


def element_steps(q: QuantizedMatrix) -> torch.Tensor:
    """Each element's quantization step (its group's scale) as a (rows, cols) float32 tensor."""
    rows, cols = q.shape
    return q.scales.to(torch.float32)[:, torch.arange(cols) // q.group_size]


@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_error_within_one_step(bits: int, group_size: int) -> None:
    matrix = gaussian(ROWS, COLS, seed=bits * 100 + group_size)
    q = quantize_rtn(matrix, bits=bits, group_size=group_size)
    assert q.codes.shape == (ROWS, COLS)
    assert q.scales.shape == q.zeros.shape == (ROWS, num_groups(COLS, min(group_size, COLS)))
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= (1 << bits) - 1
    assert int(q.zeros.max()) <= (1 << bits) - 1
    error = (matrix - q.dequantize()).abs()
    steps = element_steps(q)
    worst = (error / steps).max().item()
    assert worst <= 1.0 + 1e-5, f"an element is off by {worst:.2f} quantization steps (bound: 1)"
    # Round-to-nearest averages a quarter step; well below one step.
    assert (error / steps).mean().item() < 0.4


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_codes_cover_the_full_range(bits: int) -> None:
    """min/max fitting uses both ends of the code range in a group that spans zero."""
    matrix = gaussian(8, 64, seed=bits)
    q = quantize_rtn(matrix, bits=bits, group_size=64)
    assert int(q.codes.min()) == 0
    assert int(q.codes.max()) == (1 << bits) - 1


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_same_sign_group_within_one_step(bits: int) -> None:
    """A group whose values are all positive (or all negative) must also meet the bound.

    Such groups are common for short tail groups and small group sizes. The zero point is
    clamped to [0, 2**bits - 1], so the fitted range must include 0 for the bound to hold.
    """
    matrix = torch.tensor([
        [1.00, 1.25, 1.50, 2.00],
        [-2.00, -1.75, -1.10, -1.00],
        [0.50, 0.60, 0.70, 0.80],
    ])
    q = quantize_rtn(matrix, bits=bits, group_size=4)
    worst = ((matrix - q.dequantize()).abs() / element_steps(q)).max().item()
    assert worst <= 1.0 + 1e-5, f"same-sign group off by {worst:.1f} quantization steps (bound: 1)"


@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("group_size", [3, 4, 8])
def test_constant_groups_round_trip_exactly(bits: int, group_size: int) -> None:
    """Constant groups (zero, negative, positive; float16-representable) have no range but are exact."""
    rows = [0.0, -0.375, 2.5, -3.0, 0.0078125]
    matrix = torch.tensor(rows).unsqueeze(1).repeat(1, 8)
    q = quantize_rtn(matrix, bits=bits, group_size=group_size)
    assert torch.equal(q.dequantize(), matrix)


def test_constant_group_next_to_varying_group() -> None:
    matrix = torch.cat([torch.full((4, 16), -0.5), gaussian(4, 16, seed=1)], dim=1)
    q = quantize_rtn(matrix, bits=4, group_size=16)
    assert torch.equal(q.dequantize()[:, :16], matrix[:, :16])


@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_packed_round_trip_is_exact(bits: int, group_size: int) -> None:
    q = quantize_rtn(gaussian(ROWS, COLS, seed=3), bits=bits, group_size=group_size)
    codes, scales, zeros = q.packed()
    assert codes.dtype == zeros.dtype == torch.uint8
    assert scales.dtype == torch.float16
    back = QuantizedMatrix.from_packed(
        codes, scales, zeros, rows=ROWS, cols=COLS, bits=bits, group_size=group_size
    )
    assert torch.equal(back.codes, q.codes) and back.codes.dtype == q.codes.dtype
    assert torch.equal(back.scales, q.scales) and back.scales.dtype == q.scales.dtype
    assert torch.equal(back.zeros, q.zeros) and back.zeros.dtype == q.zeros.dtype
    assert back.bits == bits
    assert torch.equal(back.dequantize(), q.dequantize())


@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("rows,cols,group_size", [(48, 100, 20), (48, 100, 32), (7, 13, 128), (1, 1, 4)])
def test_storage_bits_match_packed_tensors(bits: int, rows: int, cols: int, group_size: int) -> None:
    q = quantize_rtn(gaussian(rows, cols, seed=5), bits=bits, group_size=group_size)
    codes, scales, zeros = q.packed()
    code_bytes = codes.numel() * codes.element_size()
    zero_bytes = zeros.numel() * zeros.element_size()
    assert code_bytes == math.ceil(rows * cols * bits / 8)
    assert packed_sizes(rows, cols, bits, group_size) == (code_bytes, scales.numel(), zero_bytes)
    assert storage_bits(rows, cols, bits, group_size) == 8 * (code_bytes + zero_bytes) + 16 * scales.numel()


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_more_bits_give_lower_error(group_size: int) -> None:
    matrix = gaussian(ROWS, COLS, seed=9)
    errors = [
        torch.linalg.norm(matrix - quantize_rtn(matrix, bits=b, group_size=group_size).dequantize()).item()
        for b in sorted(QUANT_BITS)
    ]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_unsupported_bits_are_refused(bits: int) -> None:
    with pytest.raises(ValueError):
        quantize_rtn(gaussian(2, 4, seed=0), bits=bits, group_size=4)
