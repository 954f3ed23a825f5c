"""Tests for the built-in compression operators against the error bounds their docstrings promise,
plus params validation. The generic contract (determinism, dtype and shape, byte accounting...)
is the conformance suite's job, run for every operator in test_plugins.py."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch

from skillhub.errors import OperatorError
from skillhub.operators import EncodeContext, Encoded, get_operator, operator_names, resolve_params
from skillhub.numerics.quantize import QuantizedMatrix, num_groups, packed_sizes
from skillhub.numerics.svd import prefers_randomized, svd_mixed_bytes
from skillhub.operators.builtin.svd import resolve_rank_groups

BUILTINS = ["raw", "rtn", "magnitude-prune", "svd", "lowrank", "svd-mixed"]
ROWS, COLS = 96, 160
CTX = EncodeContext(name="model.layers.0.mlp.down_proj.weight", role="mlp", seed=0)
FP16_SLACK = 2e-3  # relative Frobenius error float16 factors may add (~4 half-ulps)

# Params that make each operator do real work on the test delta.
SAMPLE_PARAMS: dict[str, dict[str, Any]] = {
    "raw": {"dtype": "float16"},
    "rtn": {"bits": 4, "group_size": 64},
    "magnitude-prune": {"keep": 0.1, "bits": 4},
    "svd": {"energy": 0.9},
    "lowrank": {"rank": 8},
    "svd-mixed": {"groups": [[4, 8], [12, 4], [16, 2]], "group_size": 64},
}


def low_rank_delta(rows: int, cols: int, *, rank: int = 24, noise: float = 2e-4, seed: int = 0) -> torch.Tensor:
    """A float32 delta: orthonormal low-rank signal with a geometrically decaying spectrum + noise."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, rank, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(cols, rank, generator=gen)).Q
    sigma = 0.5 * 0.8 ** torch.arange(rank, dtype=torch.float32)
    return (u * sigma) @ v.T + noise * torch.randn(rows, cols, generator=gen)


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """Run this module's SVDs on one thread: on a busy 2-core machine multi-threaded LAPACK
    SVDs of a 300x500 matrix were seen to take ~5 s instead of ~15 ms (spinning workers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def delta() -> torch.Tensor:
    return low_rank_delta(ROWS, COLS)


@pytest.fixture(scope="module")
def sigma(delta: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(delta.double())


def params_for(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    return resolve_params(get_operator(name), given, where="test")


def round_trip(name: str, tensor: torch.Tensor, given: Mapping[str, Any],
               ctx: EncodeContext = CTX) -> tuple[Encoded, dict[str, Any], torch.Tensor]:
    op = get_operator(name)
    params = params_for(name, given)
    encoded = op.encode(tensor, params, ctx)
    decoded = op.decode(encoded.tensors, encoded.meta, params, tuple(tensor.shape), version=op.version)
    return encoded, params, decoded


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(a.double())).item()


def truncation_error(sigma: torch.Tensor, rank: int) -> float:
    """Eckart-Young optimum sqrt(sum_{i>r} sigma_i^2) (absolute)."""
    return math.sqrt(float((sigma[rank:] ** 2).sum()))


def stored_bytes(encoded: Encoded) -> int:
    return sum(t.numel() * t.element_size() for t in encoded.tensors.values())


def step_norm(scales: torch.Tensor, rows: int, cols: int, group_size: int) -> float:
    """sqrt(sum over elements of (its group's step)^2) for a (rows, cols) quantized matrix:
    a Frobenius bound on its quantization error when each element is within one step."""
    size = min(group_size, cols)
    groups = num_groups(cols, size)
    lengths = torch.tensor([min(size, cols - g * size) for g in range(groups)], dtype=torch.float64)
    squared = scales.to(torch.float64).reshape(rows, groups) ** 2
    return math.sqrt(float((squared * lengths).sum()))


# --------------------------------------------------------------------------- raw


def test_raw_float32_is_exact(delta: torch.Tensor) -> None:
    _, _, decoded = round_trip("raw", delta, {"dtype": "float32"})
    assert torch.equal(decoded, delta)


@pytest.mark.parametrize("dtype,bound", [("float16", 2.0**-11), ("bfloat16", 2.0**-8)])
def test_raw_half_precision_within_half_ulp(delta: torch.Tensor, dtype: str, bound: float) -> None:
    encoded, _, decoded = round_trip("raw", delta, {"dtype": dtype})
    assert encoded.tensors["values"].dtype == getattr(torch, dtype)
    tiny = torch.finfo(getattr(torch, dtype)).tiny
    normal = delta.abs() >= tiny
    assert normal.float().mean() > 0.99  # the bound is about the normal range: make sure it is tested
    relative = ((decoded - delta).abs() / delta.abs())[normal]
    assert relative.max().item() <= bound
    assert relative.max().item() > bound / 4  # rounding happened: the test is not vacuous
    # Subnormals: absolute error at most half the smallest subnormal spacing.
    half_subnormal_spacing = tiny * torch.finfo(getattr(torch, dtype)).eps / 2
    assert ((decoded - delta).abs()[~normal] <= half_subnormal_spacing).all()


# --------------------------------------------------------------------------- rtn


def _rtn_steps(encoded: Encoded, params: Mapping[str, Any], rows: int, cols: int) -> torch.Tensor:
    q = QuantizedMatrix.from_packed(
        encoded.tensors["codes"], encoded.tensors["scales"], encoded.tensors["zeros"],
        rows=rows, cols=cols, bits=params["bits"], group_size=params["group_size"],
    )
    return q.scales.to(torch.float32)[:, torch.arange(cols) // params["group_size"]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(ROWS, COLS), (8, 12, 20), (300,)])
def test_rtn_error_within_one_step(delta: torch.Tensor, bits: int, shape: tuple[int, ...]) -> None:
    tensor = delta.reshape(-1)[: math.prod(shape)].reshape(shape).clone()
    rows = shape[0] if len(shape) > 1 else 1
    cols = math.prod(shape) // rows
    encoded, params, decoded = round_trip("rtn", tensor, {"bits": bits})
    steps = _rtn_steps(encoded, params, rows, cols).reshape(shape)
    error = (decoded - tensor).abs()
    assert (error <= steps * (1 + 1e-5)).all()
    assert (error / steps).mean().item() < 0.4
    code_bytes, scales, zero_bytes = packed_sizes(rows, cols, bits, params["group_size"])
    assert stored_bytes(encoded) == code_bytes + 2 * scales + zero_bytes


def positive_rank_one_delta() -> torch.Tensor:
    """A delta dominated by an all-positive direction (a shift shared by every row), as fine-tunes
    of embeddings or biases-folded weights produce: every quantization group is single-signed."""
    gen = torch.Generator().manual_seed(7)
    u = torch.rand(ROWS, generator=gen) + 0.5
    v = torch.rand(COLS, generator=gen) + 0.5
    return 0.01 * torch.outer(u, v) + 1e-4 * torch.randn(ROWS, COLS, generator=gen)


def test_rtn_error_within_one_step_on_single_signed_groups() -> None:
    tensor = positive_rank_one_delta()
    encoded, params, decoded = round_trip("rtn", tensor, {"bits": 4})
    steps = _rtn_steps(encoded, params, ROWS, COLS)
    worst = ((decoded - tensor).abs() / steps).max().item()
    assert worst <= 1 + 1e-5, f"off by {worst:.1f} quantization steps (documented bound: 1)"


def test_svd_mixed_single_signed_singular_vectors() -> None:
    """The top singular vectors of this delta are all-positive; 8-bit factors must still be accurate."""
    tensor = positive_rank_one_delta()
    _, _, decoded = round_trip("svd-mixed", tensor, {"groups": [[4, 8]]})
    sigma = torch.linalg.svdvals(tensor.double())
    truncation = truncation_error(sigma, 4) / float(torch.linalg.norm(tensor.double()))
    assert rel_error(tensor, decoded) < truncation + 0.02


# --------------------------------------------------------------------------- magnitude-prune


@pytest.mark.parametrize("keep", [0.5, 0.1, 0.01])
def test_prune_keeps_exactly_the_largest(delta: torch.Tensor, keep: float) -> None:
    _, _, decoded = round_trip("magnitude-prune", delta, {"keep": keep, "bits": 16})
    n = delta.numel()
    kept_mask = decoded != 0
    assert int(kept_mask.sum()) == math.ceil(keep * n)
    assert delta.abs()[kept_mask].min() >= delta.abs()[~kept_mask].max()
    # Kept entries are the float16 values of the originals, at the same positions.
    assert torch.equal(decoded[kept_mask], delta[kept_mask].half().float())


@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_prune_float16_error_is_dropped_energy(delta: torch.Tensor, keep: float) -> None:
    _, _, decoded = round_trip("magnitude-prune", delta, {"keep": keep, "bits": 16})
    kept_mask = decoded != 0
    dropped_sq = float((delta[~kept_mask].double() ** 2).sum())
    rounding_sq = float(((delta[kept_mask] - delta[kept_mask].half().float()).double() ** 2).sum())
    error_sq = float(((decoded - delta).double() ** 2).sum())
    assert error_sq == pytest.approx(dropped_sq + rounding_sq, rel=1e-9)
    # float16 rounding is a tiny part of it
    assert rounding_sq < 1e-4 * dropped_sq


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [128, 100])
def test_prune_quantized_error_bound(delta: torch.Tensor, bits: int, group_size: int) -> None:
    keep = 0.2
    encoded, params, decoded = round_trip(
        "magnitude-prune", delta, {"keep": keep, "bits": bits, "group_size": group_size})
    kept = encoded.meta["kept"]
    assert kept == math.ceil(keep * delta.numel())
    top = torch.zeros(delta.numel(), dtype=torch.bool)
    top[delta.reshape(-1).abs().argsort(descending=True)[:kept]] = True
    top = top.reshape(delta.shape)
    assert not (decoded[~top] != 0).any()  # nothing outside the top-k is stored
    dropped_sq = float((delta[~top].double() ** 2).sum())
    quant_sq = step_norm(encoded.tensors["scales"], 1, kept, group_size) ** 2
    error_sq = float(((decoded - delta).double() ** 2).sum())
    assert dropped_sq <= error_sq <= dropped_sq + quant_sq


@pytest.mark.parametrize("keep,bits", [(0.5, 16), (0.5, 4), (0.01, 16), (0.01, 2)])
def test_prune_index_modes_agree(delta: torch.Tensor, keep: float, bits: int) -> None:
    """bitmask, gaps and auto all decode to the same tensor."""
    results = {
        index: round_trip("magnitude-prune", delta, {"keep": keep, "bits": bits, "index": index})
        for index in ("bitmask", "gaps", "auto")
    }
    assert "mask" in results["bitmask"][0].tensors and "gaps" not in results["bitmask"][0].tensors
    assert "gaps" in results["gaps"][0].tensors and "mask" not in results["gaps"][0].tensors
    assert torch.equal(results["bitmask"][2], results["gaps"][2])
    assert torch.equal(results["auto"][2], results["gaps"][2])


@pytest.mark.parametrize("keep,expected", [(0.5, "bitmask"), (0.01, "gaps")])
def test_prune_auto_picks_smaller_index(delta: torch.Tensor, keep: float, expected: str) -> None:
    mask_bytes = stored_bytes(round_trip("magnitude-prune", delta, {"keep": keep, "index": "bitmask"})[0])
    gap_bytes = stored_bytes(round_trip("magnitude-prune", delta, {"keep": keep, "index": "gaps"})[0])
    encoded, _, _ = round_trip("magnitude-prune", delta, {"keep": keep, "index": "auto"})
    assert encoded.meta["index"] == expected
    assert stored_bytes(encoded) == min(mask_bytes, gap_bytes)


def test_prune_one_dimensional(delta: torch.Tensor) -> None:
    tensor = delta.reshape(-1)[:1000].clone()
    for index in ("bitmask", "gaps"):
        _, _, decoded = round_trip("magnitude-prune", tensor, {"keep": 0.1, "bits": 16, "index": index})
        assert decoded.shape == (1000,)
        assert int((decoded != 0).sum()) == 100
        assert tensor.abs()[decoded != 0].min() >= tensor.abs()[decoded == 0].max()


def test_prune_ties_keep_lowest_index() -> None:
    tensor = torch.tensor([1.0, -1.0, 1.0, 3.0, 1.0, -1.0, 0.5, 1.0])
    _, _, decoded = round_trip("magnitude-prune", tensor, {"keep": 0.375, "bits": 16})
    assert decoded.tolist() == [1.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- svd


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_svd_energy_bound_and_minimal_rank(delta: torch.Tensor, energy: float) -> None:
    encoded, _, decoded = round_trip("svd", delta, {"energy": energy})
    rank = encoded.meta["rank"]
    s = torch.linalg.svdvals(delta).double()
    cumulative = torch.cumsum(s**2, 0) / (s**2).sum()
    assert cumulative[rank - 1] >= energy
    assert rank == 1 or cumulative[rank - 2] < energy, "a smaller rank already keeps that energy"
    assert encoded.tensors["A"].shape == (rank, COLS) and encoded.tensors["B"].shape == (ROWS, rank)
    assert encoded.tensors["A"].dtype == torch.float16
    assert rel_error(delta, decoded) ** 2 <= 1 - energy + FP16_SLACK**2 + 2 * FP16_SLACK * math.sqrt(1 - energy)


def test_svd_energy_ranks_increase(delta: torch.Tensor) -> None:
    ranks = [round_trip("svd", delta, {"energy": e})[0].meta["rank"] for e in (0.5, 0.9, 0.99, 1.0)]
    assert ranks == sorted(ranks) and len(set(ranks)) == 4


def test_svd_full_energy_reconstructs(delta: torch.Tensor) -> None:
    encoded, _, decoded = round_trip("svd", delta, {"energy": 1.0})
    assert encoded.meta["rank"] == min(ROWS, COLS)  # noise makes the delta numerically full rank
    assert rel_error(delta, decoded) <= FP16_SLACK
    _, _, decoded32 = round_trip("svd", delta, {"energy": 1.0, "dtype": "float32"})
    assert rel_error(delta, decoded32) <= 1e-5


def test_svd_full_energy_of_low_rank_matrix_keeps_numerical_rank() -> None:
    exact = low_rank_delta(ROWS, COLS, rank=6, noise=0.0)
    encoded, _, decoded = round_trip("svd", exact, {"energy": 1.0, "dtype": "float32"})
    assert encoded.meta["rank"] == 6
    assert rel_error(exact, decoded) <= 1e-5


# --------------------------------------------------------------------------- lowrank


@pytest.mark.parametrize("rows,cols,rank,randomized", [
    (300, 500, 4, True),  # a low rank of a larger matrix: the randomized range finder
    (ROWS, COLS, 10, False),  # small matrices: the Gram eigendecomposition
    (ROWS, COLS, 40, False),  # a larger share of the rank: the Gram eigendecomposition
])
def test_lowrank_near_eckart_young(rows: int, cols: int, rank: int, randomized: bool) -> None:
    matrix = low_rank_delta(rows, cols, rank=min(rows, 60), noise=1e-4, seed=rows)
    sigma = torch.linalg.svdvals(matrix.double())
    assert prefers_randomized(rows, cols, rank) == randomized
    encoded, _, decoded = round_trip("lowrank", matrix, {"rank": rank})
    assert encoded.meta["rank"] == rank
    assert encoded.tensors["A"].shape == (rank, cols) and encoded.tensors["B"].shape == (rows, rank)
    optimum = truncation_error(sigma, rank) / float(torch.linalg.norm(matrix.double()))
    assert rel_error(matrix, decoded) <= 1.02 * optimum + FP16_SLACK
    assert rel_error(matrix, decoded) >= optimum * (1 - 1e-6)  # Eckart-Young: nothing beats it


def test_lowrank_float32_factors_match_optimum_closely() -> None:
    matrix = low_rank_delta(300, 500, rank=60, noise=1e-4, seed=3)
    sigma = torch.linalg.svdvals(matrix.double())
    _, _, decoded = round_trip("lowrank", matrix, {"rank": 4, "dtype": "float32"})
    optimum = truncation_error(sigma, 4) / float(torch.linalg.norm(matrix.double()))
    assert rel_error(matrix, decoded) <= 1.02 * optimum


@pytest.mark.parametrize("fraction,expected", [(0.25, 24), (0.5, 48), (0.001, 1), (1.0, 96)])
def test_lowrank_rank_fraction(delta: torch.Tensor, fraction: float, expected: int) -> None:
    encoded, _, _ = round_trip("lowrank", delta, {"rank_fraction": fraction})
    assert encoded.meta["rank"] == expected
    assert encoded.tensors["A"].shape == (expected, COLS)


@pytest.mark.parametrize("given", [{"rank": 4, "rank_fraction": 0.5}, {}, {"dtype": "float32"}])
def test_lowrank_needs_exactly_one_of_rank_and_fraction(given: dict[str, Any]) -> None:
    with pytest.raises(OperatorError, match="lowrank"):
        resolve_params(get_operator("lowrank"), given, where="test")


def test_lowrank_missing_rank_message_names_the_fields() -> None:
    """Giving neither must tell the user which params are missing, like any required field does."""
    with pytest.raises(OperatorError) as info:
        resolve_params(get_operator("lowrank"), {"dtype": "float32"}, where="test")
    assert "rank" in str(info.value) and "rank_fraction" in str(info.value), str(info.value)


# --------------------------------------------------------------------------- svd-mixed


def test_rank_groups_scale_with_reference_dim() -> None:
    """Boundaries 20, 200, 1400 at 128/4096 = 0.625, 6.25, 43.75 -> 1, 6, 44."""
    resolved = resolve_rank_groups([[20, 8], [180, 3], [1200, 2]], 128, 4096)
    assert sum(r for r, _ in resolved) == round(1400 * 128 / 4096) == 44
    assert all(r >= 1 for r, _ in resolved)
    assert [b for _, b in resolved] == [8, 3, 2]
    assert resolved == [(1, 8), (5, 3), (38, 2)]


def test_rank_groups_keep_every_group_while_room_remains() -> None:
    resolved = resolve_rank_groups([[20, 8], [180, 3], [1200, 2]], 16, 4096)
    assert [b for _, b in resolved] == [8, 3, 2]
    assert all(r >= 1 for r, _ in resolved)
    assert sum(r for r, _ in resolved) == round(1400 * 16 / 4096)


def test_absolute_rank_groups_capped_at_min_dim() -> None:
    assert resolve_rank_groups([[20, 8], [30, 4]], 128, None) == [(20, 8), (30, 4)]
    resolved = resolve_rank_groups([[100, 8], [100, 4], [50, 2]], 128, None)
    assert resolved == [(100, 8), (28, 4)]
    assert sum(r for r, _ in resolved) == 128


def test_svd_mixed_all_8_bit_full_rank(delta: torch.Tensor) -> None:
    encoded, _, decoded = round_trip("svd-mixed", delta, {"groups": [[ROWS, 8]]})
    assert encoded.meta["rank"] == ROWS
    assert rel_error(delta, decoded) < 0.02


@pytest.mark.parametrize("groups,group_size", [
    ([[4, 8], [12, 4], [16, 2]], 64),
    ([[2, 8], [6, 3], [30, 2]], 128),
    ([[8, 4], [8, 2]], 32),
    ([[8, 8], [16, 8]], 128),
    ([[4, 8], [12, 4]], 64),
    ([[24, 8]], 32),
])
def test_svd_mixed_error_between_truncation_and_bound(
    delta: torch.Tensor, sigma: torch.Tensor, groups: list[list[int]], group_size: int
) -> None:
    """truncation(r) <= error <= truncation(r) + sum_g sigma_max(g) * (eU + ||U^||_2 * eV) + S rounding.

    eU, eV are Frobenius bounds on the factor errors from the one-step element bound,
    and ||U^_g||_2 <= 1 + eU because U_g has orthonormal columns.
    """
    encoded, _, decoded = round_trip("svd-mixed", delta, {"groups": groups, "group_size": group_size})
    rank = encoded.meta["rank"]
    assert rank == sum(r for r, _ in groups)
    truncation = truncation_error(sigma, rank)
    error = float(torch.linalg.norm(decoded.double() - delta.double()))
    assert error >= truncation * (1 - 1e-6)
    bound = truncation
    start = 0
    for size, bits in encoded.meta["groups"]:
        u_scales = _group_slice(encoded, "U.scales", start, size, ROWS, group_size)
        v_scales = _group_slice(encoded, "V.scales", start, size, COLS, group_size)
        e_u = step_norm(u_scales, size, ROWS, group_size)
        e_v = step_norm(v_scales, size, COLS, group_size)
        top = float(sigma[start])
        bound += top * (e_u + (1 + e_u) * e_v)
        bound += top * 2.0**-11 * (1 + e_u) * (math.sqrt(size) + e_v)  # float16 singular values
        start += size
    assert error <= bound
    norm = float(torch.linalg.norm(delta.double()))
    assert error < 0.5 * norm  # far better than decoding to zero, whatever the bits
    if all(bits == 8 for _, bits in groups):
        # The docstring bound is loose for 2-4 bit groups (sigma_max times a Frobenius norm over
        # the whole group) but informative at 8 bits: make sure the check above was not vacuous.
        assert bound - truncation < 0.15 * norm


def _group_slice(encoded: Encoded, key: str, start_direction: int, size: int, length: int,
                 group_size: int) -> torch.Tensor:
    """Scales of rank group starting at ``start_direction`` in the concatenated scales tensor."""
    per_direction = num_groups(length, group_size)
    offset = start_direction * per_direction
    return encoded.tensors[key][offset: offset + size * per_direction]


@pytest.mark.parametrize("groups,group_size,reference_dim", [
    ([[4, 8], [12, 4], [16, 2]], 64, None),
    ([[3, 3], [5, 2]], 128, None),
    ([[20, 8], [180, 3], [1200, 2]], 128, 4096),
    ([[1, 2]], 7, None),
])
def test_svd_mixed_stored_bytes(delta: torch.Tensor, groups: list[list[int]], group_size: int,
                                reference_dim: int | None) -> None:
    encoded, _, _ = round_trip(
        "svd-mixed", delta, {"groups": groups, "group_size": group_size, "reference_dim": reference_dim})
    resolved = [tuple(g) for g in encoded.meta["groups"]]
    assert resolved == resolve_rank_groups(groups, min(ROWS, COLS), reference_dim)
    assert stored_bytes(encoded) == svd_mixed_bytes(ROWS, COLS, resolved, group_size)
    # ...and the same number from the per-tensor packed sizes, rounded per group and side.
    expected = 2 * sum(r for r, _ in resolved)  # float16 singular values
    for rank, b in resolved:
        for length in (ROWS, COLS):
            code_bytes, scales, zero_bytes = packed_sizes(rank, length, b, group_size)
            expected += code_bytes + 2 * scales + zero_bytes
    assert stored_bytes(encoded) == expected


def test_svd_mixed_low_bit_tail_is_smaller(delta: torch.Tensor) -> None:
    low = stored_bytes(round_trip("svd-mixed", delta, {"groups": [[8, 8], [36, 2]]})[0])
    high = stored_bytes(round_trip("svd-mixed", delta, {"groups": [[8, 8], [36, 8]]})[0])
    assert low < high


def test_svd_mixed_reference_dim_through_encode() -> None:
    matrix = low_rank_delta(128, 192, rank=48, seed=5)
    encoded, _, decoded = round_trip(
        "svd-mixed", matrix, {"groups": [[20, 8], [180, 3], [1200, 2]], "reference_dim": 4096})
    assert encoded.meta["rank"] == 44
    assert encoded.meta["groups"] == [[1, 8], [5, 3], [38, 2]]
    assert decoded.shape == (128, 192)


# --------------------------------------------------------------------------- every operator


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("shape", [(ROWS, COLS), (8, 12, 20)])
def test_decode_is_float32_of_original_shape(delta: torch.Tensor, name: str, shape: tuple[int, ...]) -> None:
    tensor = delta.reshape(-1)[: math.prod(shape)].reshape(shape).clone()
    _, _, decoded = round_trip(name, tensor, SAMPLE_PARAMS[name])
    assert decoded.dtype == torch.float32
    assert decoded.shape == shape
    assert rel_error(tensor, decoded) < 0.8  # decodes to something close to the input, not garbage


@pytest.mark.parametrize("name", ["svd", "lowrank", "svd-mixed"])
def test_matrix_operators_refuse_vectors(name: str) -> None:
    op = get_operator(name)
    with pytest.raises(ValueError, match="matrix"):
        op.encode(torch.ones(10), params_for(name, SAMPLE_PARAMS[name]), CTX)


@pytest.mark.parametrize("name", ["raw", "rtn", "magnitude-prune"])
def test_elementwise_operators_accept_vectors(name: str) -> None:
    tensor = torch.linspace(-1, 1, 257)
    _, _, decoded = round_trip(name, tensor, SAMPLE_PARAMS[name])
    assert decoded.shape == (257,) and decoded.dtype == torch.float32


# --------------------------------------------------------------------------- params and versions


@pytest.mark.parametrize("name,expected", [
    ("raw", {"dtype": "float16"}),
    ("rtn", {"bits": 4, "group_size": 128}),
    ("magnitude-prune", {"keep": 0.5, "bits": 4, "group_size": 128, "index": "auto"}),
    ("svd", {"energy": 1.0, "dtype": "float16"}),
    ("lowrank", {"rank": 8, "dtype": "float16"}),
    ("svd-mixed", {"groups": [[4, 8]], "reference_dim": None, "group_size": 128, "quantizer": "auto",
                   "act_order": False, "damp": 0.01}),
])
def test_resolve_params_fills_defaults(name: str, expected: dict[str, Any]) -> None:
    given = {k: v for k, v in expected.items() if k in ("rank", "groups")}
    assert resolve_params(get_operator(name), given, where="test") == expected


def test_resolve_params_does_not_share_defaults() -> None:
    op = get_operator("svd-mixed")
    resolved = resolve_params(op, {"groups": [[1, 8]]}, where="test")
    resolved["groups"].append([2, 2])
    assert resolve_params(op, {"groups": [[1, 8]]}, where="test")["groups"] == [[1, 8]]


@pytest.mark.parametrize("name,given,field", [
    ("rtn", {"bitz": 4}, "bitz"),
    ("raw", {"dtype": "float64"}, "dtype"),
    ("rtn", {"bits": 5}, "bits"),
    ("rtn", {"group_size": 0}, "group_size"),
    ("magnitude-prune", {"keep": 0}, "keep"),
    ("magnitude-prune", {"keep": 1.5}, "keep"),
    ("magnitude-prune", {"index": "csr"}, "index"),
    ("svd", {"energy": 0}, "energy"),
    ("lowrank", {"rank": 0}, "rank"),
    ("svd-mixed", {}, "groups"),
    ("svd-mixed", {"groups": []}, "groups"),
    ("svd-mixed", {"groups": [[4, 5]]}, "groups/0/1"),
    ("svd-mixed", {"groups": [[0, 8]]}, "groups/0/0"),
    ("svd-mixed", {"groups": [[4, 8, 1]]}, "groups/0"),
    ("svd-mixed", {"groups": [[4, 8]], "reference_dim": 0}, "reference_dim"),
])
def test_resolve_params_rejects_naming_the_field(name: str, given: dict[str, Any], field: str) -> None:
    with pytest.raises(OperatorError) as info:
        resolve_params(get_operator(name), given, where="recipe 'x' rule 2")
    message = str(info.value)
    assert field in message
    assert "recipe 'x' rule 2" in message and repr(name) in message


def test_resolve_params_lists_every_invalid_field() -> None:
    with pytest.raises(OperatorError) as info:
        resolve_params(get_operator("rtn"), {"bits": 5, "group_size": 0}, where="test")
    assert "bits" in str(info.value) and "group_size" in str(info.value)


def test_unknown_operator_lists_installed() -> None:
    with pytest.raises(OperatorError) as info:
        get_operator("nope")
    message = str(info.value)
    assert "'nope'" in message
    for name in BUILTINS:
        assert name in message
    assert set(BUILTINS) <= set(operator_names())
