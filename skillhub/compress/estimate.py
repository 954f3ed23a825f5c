"""``create --dry-run``: what ``create`` would do and cost, from the checkpoints' headers alone.

For every module: its role, operator and parameters, its parts (experts, fused projections), the
rank groups of an SVD, the bytes it will store, and a prediction of its seconds and peak memory.
Times come from a cost model whose rates are measured on this machine in about a second (one
float32 matrix product, one symmetric eigendecomposition, a few hundred GPTQ columns): the
operations ``create`` spends its time in (see bench/bench_scale.py). Bytes are exact for
``svd-mixed``, ``lowrank``, ``rtn`` and ``raw``, an upper bound for ``magnitude-prune`` (its index
is the smaller of a bitmask and gap codes, whose width depends on the data), and unknown for
``svd`` (its rank follows the spectrum) and for plugins.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from skillhub.compress.recipe import ModulePlan
from skillhub.io.checkpoint import Checkpoint
from skillhub.numerics.gptq import gptq_quantize
from skillhub.numerics.quantize import packed_sizes
from skillhub.operators.builtin.rtn import as_matrix
from skillhub.operators.builtin.svd import resolve_rank_groups


@dataclass(frozen=True)
class MachineRates:
    """What this machine does per second, measured now."""

    matmul_flops: float  # float32 matrix product
    eigh_per_cube: float  # seconds per n^3 of a symmetric eigendecomposition
    gptq_column: float  # seconds per column GPTQ visits: its Python loop, nearly flat in the rows

    @classmethod
    def measure(cls, device: torch.device) -> MachineRates:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(1024, 1024, generator=generator).to(device)
        symmetric = a @ a.T
        a @ a  # warm-up
        start = time.perf_counter()
        for _ in range(3):
            a @ a
        matmul = 3 * 2 * 1024**3 / (time.perf_counter() - start)
        big = torch.randn(2048, 2048, generator=generator).to(device)
        big = big @ big.T
        start = time.perf_counter()
        torch.linalg.eigh(big)  # at 2048: smaller ones carry fixed costs that inflate the n^3 rate
        eigh = (time.perf_counter() - start) / 2048**3
        rows = torch.randn(1000, 512, generator=generator)
        hessian = symmetric[:512, :512] + 512 * torch.eye(512)
        gptq_quantize(rows[:, :128], hessian[:128, :128], bits=4, group_size=128)  # warm-up
        start = time.perf_counter()
        gptq_quantize(rows, hessian, bits=4, group_size=128)
        return cls(matmul, eigh, (time.perf_counter() - start) / 512)


@dataclass(frozen=True)
class ModuleEstimate:
    """One module as ``create`` would compress it."""

    name: str
    role: str
    operator: str
    shape: list[int]
    parts: int
    rank_groups: list[list[int]] | None  # [[rank, bits], ...] of one part, for svd-mixed
    stored_bytes: int | None  # None: depends on the data
    bytes_exact: bool
    seconds: float
    peak_bytes: int


def _stored_bytes(plan: ModulePlan, shape: tuple[int, ...]) -> tuple[int | None, bool, list[list[int]] | None]:
    """(bytes, exact?, rank groups) of one part of ``shape`` under ``plan``'s operator: the fields
    its ``expected_fields`` lays out for the meta it will write, where that meta does not depend
    on the data."""
    params, numel, operator = plan.params, math.prod(shape), plan.operator
    if operator.name == "magnitude-prune":
        kept = max(1, math.ceil(params["keep"] * numel))
        if params["bits"] == 16:
            values = 2 * kept
        else:
            codes, scales, zeros = packed_sizes(1, kept, params["bits"], params["group_size"])
            values = codes + 2 * scales + zeros
        return values + (numel + 7) // 8, False, None  # at most: the index is never above a bitmask
    groups = None
    if operator.name in ("raw", "rtn"):
        meta: dict[str, Any] = {}
    elif operator.name in ("svd-mixed", "lowrank") and len(shape) >= 2:
        rows, cols = as_matrix(shape)
        if operator.name == "lowrank":
            meta = {"rank": min(params.get("rank") or max(1, round(params["rank_fraction"] * min(rows, cols))),
                                rows, cols)}
        else:
            groups = [list(g) for g in resolve_rank_groups(params["groups"], min(rows, cols), params["reference_dim"])]
            meta = {"rank": sum(size for size, _ in groups), "groups": groups}
    else:
        return None, False, None
    fields = operator.expected_fields(meta, params, shape, version=operator.version)
    return sum(math.prod(size) * dtype.itemsize for dtype, size in fields.values()), True, groups


def _seconds_and_peak(plan: ModulePlan, shape: tuple[int, ...], groups: list[list[int]] | None,
                      rates: MachineRates, calibrated: bool) -> tuple[float, int]:
    """Predicted seconds and peak bytes of one part: the Gram SVD, the quantization, the decode
    that measures the error, and with calibration GPTQ's factorization and column loop."""
    numel = math.prod(shape)
    peak = 3 * 4 * numel  # the float32 delta, its decoded copy, the tensor being read
    if groups is None:
        return 2e-8 * numel, peak  # a pass or two over the data (raw, pruning, RTN)
    rows, cols = as_matrix(shape)
    big, small = max(rows, cols), min(rows, cols)
    rank = sum(size for size, _ in groups)
    flops = 2 * big * small**2 + 2 * big * small * rank + 2 * rows * rank * cols  # Gram, projection, decode
    seconds = flops / rates.matmul_flops + rates.eigh_per_cube * small**3
    peak += 4 * small**2 * 2  # the Gram matrix and its eigenvectors
    if calibrated:
        inputs = cols  # the Hessian is over the matrix's input features
        seconds += (2 / 3 * inputs**3 + 2 * rank * inputs**2) / rates.matmul_flops  # potrf+trtri, U's Hessians
        seconds += rates.gptq_column * (inputs + rank)  # V's columns (every group at once), then U's
        peak += 2 * 4 * inputs**2  # the Hessian and its inverse factor
    return seconds, peak


def estimate_modules(checkpoint: Checkpoint, plans: dict[str, ModulePlan], *, calibrated: bool,
                     device: torch.device) -> list[ModuleEstimate]:
    """Every module's estimate, in the order ``create`` visits them (nothing but headers is read)."""
    from skillhub.compress.calibrate import layer_order

    rates = MachineRates.measure(device)
    estimates = []
    for name in layer_order(list(plans)):
        plan, shape = plans[name], tuple(checkpoint.shape(name))
        parts = plan.split.part_shapes(shape) if plan.split else [shape]
        total, exact, seconds, peak, groups = 0, True, 0.0, 0, None
        for part in parts:
            stored, part_exact, groups = _stored_bytes(plan, tuple(part))
            part_seconds, part_peak = _seconds_and_peak(plan, tuple(part), groups, rates,
                                                        calibrated and plan.role in ("attention", "mlp", "head"))
            total = None if stored is None or total is None else total + stored
            exact, seconds, peak = exact and part_exact, seconds + part_seconds, max(peak, part_peak)
        estimates.append(ModuleEstimate(name, plan.role, plan.operator.name, list(shape), len(parts), groups, total,
                                        exact and total is not None, seconds, peak))
    return estimates


def calibration_peak(checkpoint: Checkpoint, *, samples: int, seqlen: int) -> int:
    """Bytes calibration holds at its peak: the largest decoder layer as stored, every Hessian of
    it in float32 (at most: matrices sharing an input share one), and one layer's activations in
    and out."""
    from skillhub.compress.calibrate import layer_index

    layers: dict[int, int] = {}
    hessians: dict[int, int] = {}
    for name in checkpoint.names():
        index = layer_index(name)
        if index is None:
            continue
        shape = checkpoint.shape(name)
        layers[index] = layers.get(index, 0) + math.prod(shape) * checkpoint.dtype(name).itemsize
        if len(shape) >= 2:
            hessians[index] = hessians.get(index, 0) + 4 * shape[-1] ** 2
    config = checkpoint.config
    width = config.get("hidden_size") or config.get("n_embd") or (config.get("text_config") or {}).get("hidden_size")
    activations = 2 * samples * seqlen * (width or 0) * 4
    return max((layers[i] + hessians.get(i, 0) for i in layers), default=0) + activations


def as_document(estimates: list[ModuleEstimate], *, calibration_bytes: int | None) -> dict[str, Any]:
    """The plan as ``--json`` prints it."""
    known = [e.stored_bytes for e in estimates if e.stored_bytes is not None]
    return {
        "modules": [asdict(e) for e in estimates],
        "totals": {
            "modules": len(estimates),
            "stored_bytes": sum(known),
            "stored_bytes_exact": all(e.bytes_exact for e in estimates),
            "seconds": sum(e.seconds for e in estimates),
            "peak_bytes": max([e.peak_bytes for e in estimates] + [calibration_bytes or 0]),
            "calibration_peak_bytes": calibration_bytes,
            "cpus": os.cpu_count(),
        },
    }


def estimate_pack(base: str | os.PathLike[str], tuned: str | os.PathLike[str], *,
                  recipe: str | os.PathLike[str] | dict[str, Any] = "paper", ratio: float | None = None,
                  calib: str | os.PathLike[str] | None = None, calib_samples: int = 128, calib_seqlen: int = 512,
                  device: str | None = None, base_revision: str | None = None, tuned_revision: str | None = None,
                  **_: Any) -> dict[str, Any]:
    """What ``create_pack`` with these arguments would do and cost (see the module docstring);
    reads the checkpoints' headers, never their weights, and writes nothing.

    Raises:
        SkillhubError: The inputs ``create_pack`` would refuse, or budget mode (``ratio``), whose
            choices come from the data.
    """
    from skillhub import config
    from skillhub.compress.delta import check_compatible
    from skillhub.compress.pipeline import plan_every_parameter
    from skillhub.compress.recipe import Recipe
    from skillhub.errors import SkillhubError
    from skillhub.io.checkpoint import open_checkpoint

    if ratio is not None:
        raise SkillhubError("--dry-run shows a recipe's plan; budget mode (--ratio) chooses from the data itself: "
                            "leave out --ratio")
    plans_recipe = Recipe(recipe)
    base_checkpoint = open_checkpoint(base, revision=base_revision)
    check_compatible(base_checkpoint, open_checkpoint(tuned, revision=tuned_revision))
    plans = plan_every_parameter(plans_recipe, base_checkpoint)
    torch_device = torch.device(device or config.default_device())
    estimates = estimate_modules(base_checkpoint, plans, calibrated=calib is not None, device=torch_device)
    calibration = calibration_peak(base_checkpoint, samples=calib_samples, seqlen=calib_seqlen) if calib else None
    return {"recipe": plans_recipe.document.get("name"), "quantizer": "gptq" if calib else "rtn",
            **as_document(estimates, calibration_bytes=calibration)}
