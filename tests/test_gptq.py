"""GPTQ: equal to round-to-nearest when inputs are white, better than it when they are not."""

from __future__ import annotations

import pytest
import torch

from skillhub.numerics.gptq import gptq_quantize, gptq_quantize_stacked, output_error, prepare_hessian
from skillhub.numerics.quantize import QUANT_BITS, fit_scale_zero, quantize_rtn


def _problem(rows: int = 48, cols: int = 160, samples: int = 600, seed: int = 0):
    """A weight matrix and correlated calibration inputs (a few strong input directions)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    mixing = torch.randn(cols, cols, generator=gen) * torch.logspace(0, -2, cols)
    inputs = mixing @ torch.randn(cols, samples, generator=gen)
    return weight, 2 * inputs @ inputs.T


@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("group_size", [32, 50, 1000])
def test_identity_hessian_gives_round_to_nearest_exactly(bits: int, group_size: int) -> None:
    weight, _ = _problem()
    gptq = gptq_quantize(weight, torch.eye(weight.shape[1]), bits=bits, group_size=group_size)
    rtn = quantize_rtn(weight, bits=bits, group_size=group_size)
    assert torch.equal(gptq.codes, rtn.codes)
    assert torch.equal(gptq.scales, rtn.scales) and torch.equal(gptq.zeros, rtn.zeros)


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_identity_hessian_column_layout_equals_rtn_of_the_transpose(bits: int) -> None:
    weight, _ = _problem(rows=200, cols=12)
    gptq = gptq_quantize(weight, torch.eye(12), bits=bits, group_size=64, scale_axis="column")
    rtn = quantize_rtn(weight.T, bits=bits, group_size=64)
    assert torch.equal(gptq.codes, rtn.codes) and torch.equal(gptq.scales, rtn.scales)


@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_calibration_error(bits: int, act_order: bool) -> None:
    weight, hessian = _problem()
    gptq = gptq_quantize(weight, hessian, bits=bits, group_size=32, act_order=act_order)
    rtn = quantize_rtn(weight, bits=bits, group_size=32)
    assert gptq.codes.min() >= 0 and gptq.codes.max() <= 2**bits - 1
    assert gptq.zeros.max() <= 2**bits - 1
    assert output_error(weight, gptq.dequantize(), hessian) < output_error(weight, rtn.dequantize(), hessian)


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_column_layout_beats_round_to_nearest(bits: int) -> None:
    weight, hessian = _problem(rows=256, cols=24)
    gptq = gptq_quantize(weight, hessian, bits=bits, group_size=64, scale_axis="column")
    rtn = quantize_rtn(weight.T, bits=bits, group_size=64)
    assert output_error(weight, gptq.dequantize().T, hessian) < output_error(weight, rtn.dequantize().T, hessian)


def test_dead_inputs_are_zeroed_and_singular_hessians_are_damped() -> None:
    weight, hessian = _problem(cols=64)
    hessian[5, :] = 0
    hessian[:, 5] = 0
    quantized = gptq_quantize(weight, hessian, bits=4, group_size=16)
    assert torch.all(quantized.dequantize()[:, 5] == 0)
    low_rank = torch.ones(64, 64)  # rank one: positive semi-definite only
    assert gptq_quantize(weight, low_rank, bits=4, group_size=16).codes.shape == weight.shape


@pytest.mark.parametrize("act_order", [False, True])
def test_a_prepared_hessian_quantizes_every_matrix_as_the_hessian_itself_does(act_order: bool) -> None:
    """svd-mixed factors the Hessian once for all its rank groups: the codes must not change."""
    weight, hessian = _problem(cols=96)
    hessian[7, :] = 0
    hessian[:, 7] = 0
    original = hessian.clone()
    prepared = prepare_hessian(hessian, damp=0.01, act_order=act_order)
    assert torch.equal(hessian, original)  # factored in a copy: the caller's Hessian is untouched
    for rows in (slice(0, 20), slice(20, 48)):  # two "rank groups", one preparation
        direct = gptq_quantize(weight[rows], hessian, bits=3, group_size=32, act_order=act_order)
        shared = gptq_quantize(weight[rows], prepared, bits=3, group_size=32)
        for ours, theirs in zip(shared.packed(), direct.packed()):
            assert torch.equal(ours, theirs)
    assert torch.all(shared.dequantize()[:, 7] == 0)


def _unit_factor(hessian: torch.Tensor) -> torch.Tensor:
    """A = R diag(R)^-1, so H = A D A^T with A unit upper triangular: R is upper triangular with
    R R^T = H, the lower Cholesky factor of H reversed, reversed."""
    factor = torch.linalg.cholesky(hessian.flip(0, 1)).flip(0, 1)
    return factor / torch.diagonal(factor)


@pytest.mark.parametrize("act_order", [False, True])
def test_the_prepared_factor_is_the_unit_upper_factor_of_the_damped_hessian(act_order: bool) -> None:
    """H + damp = A D A^T, with A read back block by block as GPTQ reads it (its upper triangle:
    below it, the buffer keeps the Hessian's other triangle)."""
    _, hessian = _problem(cols=200)
    hessian = hessian.double()
    hessian[11, :] = 0
    hessian[:, 11] = 0
    prepared = prepare_hessian(hessian, damp=0.01, act_order=act_order)
    reference = hessian.clone()
    reference[11, 11] = 1
    if act_order:
        assert torch.equal(prepared.perm, torch.argsort(torch.diag(reference), descending=True))
        reference = reference[prepared.perm][:, prepared.perm]
    reference += 0.01 * torch.diag(reference).mean() * torch.eye(200, dtype=torch.float64)
    expected = _unit_factor(reference)
    for start, stop in ((0, 64), (64, 128), (128, 200)):
        block = prepared.unit_columns(start, stop).double()
        assert torch.allclose(block, expected[:stop, start:stop], rtol=1e-4, atol=1e-5)
    assert prepared.dead.tolist() == [j == 11 for j in range(200)]


def _textbook_gptq(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int, group_size: int) -> torch.Tensor:
    """GPTQ as its paper's Algorithm 1 and reference code write it (float64, columns one by one):
    U = chol((H + damp)^-1, upper); each column's error (w - q) / U_jj is subtracted from the later
    columns along U's row; a group's scale is fitted from the weights as the earlier blocks of 128
    columns left them. The codes."""
    W = weight.double().clone()
    cols = W.shape[1]
    H = hessian.double() + 0.01 * torch.diag(hessian.double()).mean() * torch.eye(cols, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    stale = W.clone()  # W as of the start of the current block
    codes = torch.zeros_like(W)
    for j in range(cols):
        if j % 128 == 0:
            stale = W.clone()
        if j % group_size == 0:
            scale, zero = fit_scale_zero(stale[:, j:j + group_size].float(), bits)
            scale, zero = scale.double(), zero.double()
        q = torch.clamp(torch.round(W[:, j] / scale) + zero, 0, 2**bits - 1)
        codes[:, j] = q
        error = (W[:, j] - (q - zero) * scale) / U[j, j]
        W[:, j:] -= torch.outer(error, U[j, j:])
    return codes


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, 200])
def test_the_ldl_form_gives_the_codes_of_textbook_gptq(bits: int, group_size: int) -> None:
    """QuIP's LDL form (no inverse of H) is GPTQ: the same codes as Algorithm 1 with chol(H^-1),
    groups that start inside a block and groups that run past one included."""
    weight, hessian = _problem(rows=40, cols=320)
    ours = gptq_quantize(weight, hessian, bits=bits, group_size=group_size)
    expected = _textbook_gptq(weight, hessian, bits=bits, group_size=group_size)
    assert torch.equal(ours.codes.double(), expected)


@pytest.mark.parametrize("act_order", [False, True])
def test_the_u_side_hessian_comes_from_the_factors_buffer(act_order: bool) -> None:
    """Eq. 8's P H P^T, undamped, from the triangle the factorization left: equal to the product."""
    _, hessian = _problem(cols=300)
    hessian = hessian.double()
    hessian[17, :] = 0
    hessian[:, 17] = 0
    projection = torch.randn(40, 300, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    prepared = prepare_hessian(hessian, damp=0.01, act_order=act_order)
    ours = prepared.quadratic_form(projection, block=64)  # blocks that do not divide 300
    expected = projection @ hessian @ projection.T
    assert torch.allclose(ours.double(), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_an_exclusive_hessian_is_factored_in_its_own_storage() -> None:
    """overwrite: no second n x n buffer, and the same codes as the copy."""
    weight, hessian = _problem(cols=96)
    copied = prepare_hessian(hessian, damp=0.01)
    own = hessian.clone()
    in_place = prepare_hessian(own, damp=0.01, overwrite=True)
    assert in_place.reversed_factor.data_ptr() == own.data_ptr()
    assert torch.equal(in_place.reversed_factor, copied.reversed_factor)
    ours, theirs = (gptq_quantize(weight, p, bits=3, group_size=32) for p in (in_place, copied))
    assert all(torch.equal(a, b) for a, b in zip(ours.packed(), theirs.packed()))
    assert torch.equal(in_place.quadratic_form(weight), copied.quadratic_form(weight))


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_failed_factorization_is_retried_from_the_kept_triangle(overwrite: bool) -> None:
    """An indefinite Hessian (an eigenvalue of -5% of its mean diagonal) fails at 1% damping; the
    retry at 10% rebuilds it from the triangle LAPACK left, in the same buffer."""
    _, hessian = _problem(cols=120)
    values, vectors = torch.linalg.eigh(hessian.double())
    values[0] = -0.05 * float(torch.diag(hessian).mean())
    hessian = (vectors * values) @ vectors.T
    prepared = prepare_hessian(hessian.float(), damp=0.01, overwrite=overwrite)
    reference = hessian + 0.1 * torch.diag(hessian).mean() * torch.eye(120, dtype=torch.float64)
    expected = _unit_factor(reference)
    assert torch.allclose(prepared.unit_columns(0, 120).double(), expected, rtol=1e-3, atol=1e-4)
    projection = torch.randn(8, 120, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    wanted = projection @ hessian @ projection.T
    assert torch.allclose(prepared.quadratic_form(projection).double(), wanted, rtol=1e-3,
                          atol=1e-4 * float(wanted.abs().max()))


@pytest.mark.parametrize("act_order", [False, True])
def test_stacked_parts_are_quantized_as_each_alone(act_order: bool) -> None:
    """svd-mixed quantizes V^T's rank groups (8, 3 and 2 bits) in one pass over the columns."""
    weight, hessian = _problem(rows=60, cols=160)
    parts = [(4, 8), (20, 3), (36, 2)]
    prepared = prepare_hessian(hessian, damp=0.01, act_order=act_order)
    stacked = gptq_quantize_stacked(weight, prepared, parts=parts, group_size=32)
    start = 0
    for (rows, bits), ours in zip(parts, stacked):
        alone = gptq_quantize(weight[start:start + rows], prepared, bits=bits, group_size=32)
        assert ours.bits == bits and ours.shape == (rows, 160)
        assert int(ours.codes.max()) <= (1 << bits) - 1 and int(ours.zeros.max()) <= (1 << bits) - 1
        for mine, theirs in zip(ours.packed(), alone.packed()):
            assert torch.equal(mine, theirs)
        start += rows
    with pytest.raises(ValueError, match="do not stack"):
        gptq_quantize_stacked(weight, prepared, parts=[(4, 8)], group_size=32)


def test_bad_arguments_are_refused() -> None:
    weight, hessian = _problem(cols=64)
    with pytest.raises(ValueError, match="does not fit"):
        gptq_quantize(weight, hessian[:10, :10], bits=4, group_size=16)
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(weight, hessian, bits=5, group_size=16)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(weight, -torch.eye(64), bits=4, group_size=16)
