"""skillhub-bitdelta: the conformance suite, plus the promised layout, scale and error."""

from __future__ import annotations

import math

import pytest
import torch

from skillhub.operators import EncodeContext, resolve_params
from skillhub.testing import conformance_checks, relative_error, sample_delta
from skillhub_bitdelta import BitDeltaOperator

OPERATOR = BitDeltaOperator()
CTX = EncodeContext(name="layers.0.self_attn.q_proj.weight", role="attention")


def round_trip(delta: torch.Tensor, given: dict | None = None):
    params = resolve_params(OPERATOR, given or {}, where="test")
    encoded = OPERATOR.encode(delta, params, CTX)
    return encoded, OPERATOR.decode(encoded.tensors, encoded.meta, params, tuple(delta.shape), version=OPERATOR.version)


@pytest.mark.parametrize(
    "check",
    conformance_checks(OPERATOR, shapes=[(64, 96), (96, 40), (6, 10, 4), (300,)], max_relative_error=0.75),
    ids=str,
)
def test_conformance(check) -> None:
    check()


def test_packs_eight_signs_a_byte_little_endian() -> None:
    delta = torch.tensor([[1.0, -1, -1, 1, 1, 1, -1, 1, -1, 1]])  # 10 signs -> 2 bytes
    encoded, _ = round_trip(delta)
    # Bit i of byte 0 is element i (1 = non-negative): 1,0,0,1,1,1,0,1 -> 0b10111001.
    assert encoded.tensors["signs"].tolist() == [0b10111001, 0b10]


@pytest.mark.parametrize("shape", [(64, 96), (33, 7), (5,)])
def test_bytes_are_one_bit_per_element_plus_a_scale_per_row(shape: tuple[int, ...]) -> None:
    encoded, _ = round_trip(sample_delta(shape))
    rows = shape[0] if len(shape) > 1 else 1
    stored = sum(t.numel() * t.element_size() for t in encoded.tensors.values())
    assert stored == math.ceil(math.prod(shape) / 8) + 2 * rows


def test_rows_of_one_magnitude_are_exact() -> None:
    signs = torch.where(torch.rand(16, 24, generator=torch.Generator().manual_seed(0)) > 0.5, 1.0, -1.0)
    delta = signs * torch.linspace(0.5, 2.0, 16)[:, None]  # powers of two are not needed: float32 scales
    _, decoded = round_trip(delta, {"scale_dtype": "float32"})
    assert torch.allclose(decoded, delta, rtol=1e-6, atol=0)


def test_mean_absolute_scale_is_the_least_squares_choice() -> None:
    delta = sample_delta((48, 64))
    encoded, decoded = round_trip(delta, {"scale_dtype": "float32"})
    best = relative_error(delta, decoded)
    signs = torch.where(delta >= 0, 1.0, -1.0)
    for factor in (0.9, 1.1):
        assert relative_error(delta, signs * encoded.tensors["scale"][:, None] * factor) > best


def test_gaussian_rows_have_the_documented_error() -> None:
    delta = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    _, decoded = round_trip(delta, {"scale_dtype": "float32"})
    assert relative_error(delta, decoded) == pytest.approx(math.sqrt(1 - 2 / math.pi), abs=0.01)
