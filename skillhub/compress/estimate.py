"""``create --dry-run``: what ``create`` would do and cost, from the checkpoints' headers alone.

For every module: its role, operator and parameters, its parts (experts, fused projections), the
rank groups of an SVD, the bytes it will store, and a prediction of its seconds and peak memory.
Times come from a cost model whose rates are measured on this machine in a few seconds (one
float32 matrix product, one symmetric eigendecomposition, a few hundred GPTQ columns, a 32 MB
magnitude prune, whole and from row blocks, and one real ``svd-mixed`` module: its time beyond its flops, per element),
plus calibration's forward passes and Hessians by their flops: the operations ``create`` spends its
time in (see bench/bench_scale.py and bench/bench_scale_model.py, which checks the whole-model
prediction against a run). The peak is this process's resident memory (what ``create`` holds
before its first tensor: with calibration, the tokenizer and the model built without weights, made
here as ``create`` makes them) plus the largest working set: a module's (with calibration, with its
layer's Hessians, counted from the matrices' names) or calibration's. Bytes are exact for
``svd-mixed``, ``lowrank``, ``rtn`` and ``raw``, an upper bound for ``magnitude-prune`` (its index
is the smaller of a bitmask and gap codes, whose width depends on the data), and unknown for
``svd`` (its rank follows the spectrum) and for plugins.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from skillhub.compress.delta import BLOCK_ELEMENTS, RowBlocks, check_compatible, read_in_blocks
from skillhub.compress.recipe import ModulePlan
from skillhub.compress.roles import CALIBRATED_ROLES
from skillhub.io.checkpoint import Checkpoint, config_value
from skillhub.numerics.gptq import gptq_quantize
from skillhub.numerics.quantize import packed_sizes
from skillhub.operators.builtin.rtn import as_matrix
from skillhub.operators.builtin.svd import resolve_rank_groups


# Resident bytes per element of a magnitude-pruned module at its peak: the float32 delta, its
# magnitudes, kthvalue's working copy and indices, the mask, the kept positions and values, and the
# decoded copy that measures the error. Measured: 20.1 B on a 128256 x 4096 embedding at keep 0.5
# (bench/bench_scale_model.py, the embedding-and-head stage less the process before it).
_PRUNE_BYTES_PER_ELEMENT = 20
# Resident bytes of a module encoded from row blocks, beyond what it stores: a few blocks in their
# dtypes and the selections made from them. Measured: 244 MiB on a 128256 x 4096 embedding at keep 0.5
# (437 MiB above the process, 193 MiB of it the stored mask and codes).
_STREAM_WORKING_BYTES = 64 * BLOCK_ELEMENTS


@dataclass(frozen=True)
class MachineRates:
    """What this machine does per second, measured now."""

    matmul_flops: float  # float32 matrix product
    eigh_per_cube: float  # seconds per n^3 of a symmetric eigendecomposition
    gptq_column: float  # seconds per column GPTQ visits: its Python loop, nearly flat in the rows
    prune_element: float  # seconds per element of magnitude-prune's encode, decode and error
    stream_element: float  # the same from row blocks of a bfloat16 pair (three passes)
    floor_bytes: int  # this process's resident memory: what create holds before its first tensor
    svd_element: float = 0.0  # seconds per matrix element a real svd-mixed module takes beyond its flops

    @classmethod
    def measure(cls, device: torch.device) -> MachineRates:
        import psutil

        from skillhub.operators import EncodeContext, encode_module, get_operator, resolve_params

        floor = psutil.Process().memory_info().rss  # before the measurements below allocate their own
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(1024, 1024, generator=generator).to(device)
        symmetric = a @ a.T
        big = torch.randn(2048, 2048, generator=generator).to(device)
        big = big @ big.T  # also the warm-up
        start = time.perf_counter()
        for _ in range(2):  # at 2048: 1024 ran 20-50% below the rate of an 8B model's products, and varied
            big @ big
        matmul = 2 * 2 * 2048**3 / (time.perf_counter() - start)
        start = time.perf_counter()
        torch.linalg.eigh(big)  # at 2048: smaller ones carry fixed costs that inflate the n^3 rate
        eigh = (time.perf_counter() - start) / 2048**3
        rows = torch.randn(1000, 512, generator=generator)
        hessian = symmetric[:512, :512] + 512 * torch.eye(512)
        gptq_quantize(rows[:, :128], hessian[:128, :128], bits=4, group_size=128)  # warm-up
        start = time.perf_counter()
        gptq_quantize(rows, hessian, bits=4, group_size=128)
        column = (time.perf_counter() - start) / 512
        # Pruning is memory-bound: measured on 32 MB, past the caches, with the paper's settings.
        prune = get_operator("magnitude-prune")
        prune_params = resolve_params(prune, {"keep": 0.5, "bits": 4}, where="estimate")
        delta = torch.randn(2048, 4096, generator=generator)
        start = time.perf_counter()
        encode_module(prune, delta, prune_params, EncodeContext(name="estimate", role="embedding"))
        prune_element = (time.perf_counter() - start) / delta.numel()
        base = torch.randn(2048, 4096, generator=generator).to(torch.bfloat16)
        tuned = _InMemory((base.float() + 0.01 * delta).to(torch.bfloat16))
        start = time.perf_counter()
        prune.encode_blocks(RowBlocks(_InMemory(base), tuned, "estimate"), prune_params,  # type: ignore[arg-type]
                            EncodeContext(name="estimate", role="embedding"))
        stream_element = (time.perf_counter() - start) / delta.numel()
        rates = cls(matmul, eigh, column, prune_element, stream_element, floor)
        # The flops count the SVD and the decode; quantizing, bit packing and the error pass come on
        # top, in passes over the matrix. One real module (a quarter of an 8B MLP matrix, a
        # fine-tune-like decaying spectrum, the paper's ranks) says how long per element here.
        svd = get_operator("svd-mixed")
        params = resolve_params(svd, {"groups": [[20, 8], [180, 3], [1200, 2]], "reference_dim": 4096},
                                where="estimate")
        # A fine-tune's slowly decaying spectrum (sigma_i ~ i^-0.5, noise at a tenth of its energy), whose
        # kept singular values the float32 Gram resolves: a steeper one sends svd-mixed down its float64
        # path, and every module's prediction would pay for that (1.5x the time of a whole 8B model).
        left = torch.randn(1024, 1024, generator=generator) * torch.arange(1, 1025).pow(-0.5)
        matrix = left @ torch.randn(1024, 4096, generator=generator)
        noise = torch.randn(1024, 4096, generator=generator)
        matrix += noise.mul_(0.1**0.5 * matrix.norm() / noise.norm())
        start = time.perf_counter()
        encode_module(svd, matrix, params, EncodeContext(name="estimate", role="mlp"))
        measured = time.perf_counter() - start
        modeled = _svd_seconds(1024, 4096, sum(size for size, _ in resolve_rank_groups(params["groups"], 1024, 4096)),
                               rates)
        return replace(rates, svd_element=max(0.0, measured - modeled) / matrix.numel())


class _InMemory:
    """One tensor held in memory, read as :class:`RowBlocks` reads a checkpoint's (a copy per block)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensor.dtype

    def read_block(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.tensor[start:stop].clone()


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


def _svd_seconds(rows: int, cols: int, rank: int, rates: MachineRates) -> float:
    """The Gram SVD (product, eigendecomposition, projection) and the decode, by their flops."""
    big, small = max(rows, cols), min(rows, cols)
    flops = 2 * big * small**2 + 2 * big * small * rank + 2 * rows * rank * cols
    return flops / rates.matmul_flops + rates.eigh_per_cube * small**3


def _seconds_and_peak(plan: ModulePlan, shape: tuple[int, ...], groups: list[list[int]] | None,
                      rates: MachineRates, calibrated: bool, shared_hessian: bool, *, streamed: bool = False,
                      stored: int | None = None) -> tuple[float, int]:
    """Predicted seconds and working memory of one part: the Gram SVD, the quantization, the decode
    that measures the error, and with calibration GPTQ's factorization and column loop (on a
    Hessian another module shares, a copy: an exclusive one is factored in its own storage); or,
    ``streamed`` from row blocks, a few blocks and the ``stored`` bytes."""
    numel = math.prod(shape)
    if streamed:
        return rates.stream_element * numel, _STREAM_WORKING_BYTES + (stored or 0)
    if plan.operator.name == "magnitude-prune":
        return rates.prune_element * numel, _PRUNE_BYTES_PER_ELEMENT * numel
    peak = 3 * 4 * numel  # the float32 delta, its decoded copy, the tensor being read
    if groups is None:
        return 2e-8 * numel, peak  # a pass or two over the data (raw, RTN)
    rows, cols = as_matrix(shape)
    rank = sum(size for size, _ in groups)
    seconds = _svd_seconds(rows, cols, rank, rates) + rates.svd_element * numel
    peak += 4 * min(rows, cols)**2 * 2  # the Gram matrix and its eigenvectors
    if calibrated:
        inputs = cols  # the Hessian is over the matrix's input features
        seconds += (inputs**3 / 3 + rank * inputs**2) / rates.matmul_flops  # potrf, U's Hessians
        seconds += rates.gptq_column * (inputs + rank)  # V's columns (every group at once), then U's
        peak += 4 * inputs**2 if shared_hessian else 0
    return seconds, peak


# Leaf names of matrices that read one input tensor in transformers' modeling code, by group: q, k
# and v read the attention's normed input; gate and up (Mixtral's w1 and w3) the MLP's. Calibration
# keeps one Hessian for such a group (InputStatistics: one sum per input tensor). Every other matrix
# reads an input of its own (o_proj the attention's output, down_proj the MLP's activations), and so
# does a name not listed here: the count errs towards more Hessians, never fewer.
_SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "query": "qkv", "key": "qkv", "value": "qkv",
                 "wq": "qkv", "wk": "qkv", "wv": "qkv",
                 "gate_proj": "gate_up", "up_proj": "gate_up", "w1": "gate_up", "w3": "gate_up"}


def _hessian_key(name: str) -> tuple[str, str]:
    """Which Hessian calibration gives the matrix ``name``: its module's parent and its input group."""
    parent, _, leaf = name.removesuffix(".weight").rpartition(".")
    return parent, _SHARED_INPUT.get(leaf, leaf)


@dataclass(frozen=True)
class _Hessian:
    bytes: int
    readers: int  # matrices that read it: above one, GPTQ factors a copy


def _hessians_of_layers(checkpoint: Checkpoint, plans: dict[str, ModulePlan]
                        ) -> dict[int, dict[tuple[str, str], _Hessian]]:
    """Per decoder layer, the Hessians calibration holds for it: one per distinct input of its
    matrices (routers' included), float32 over the input features (a matrix's last axis, as
    ``F.linear`` applies it), one per expert for experts stored as one 3-D tensor."""
    from skillhub.compress.calibrate import layer_index

    found: dict[int, dict[tuple[str, str], _Hessian]] = {}
    for name, plan in plans.items():
        index, shape = layer_index(name), checkpoint.shape(name)
        if index is None or plan.role not in (*CALIBRATED_ROLES, "router") or len(shape) < 2:
            continue
        experts = shape[0] if len(shape) == 3 else 1
        layer, key = found.setdefault(index, {}), _hessian_key(name)
        held = layer.get(key)
        layer[key] = _Hessian(max(held.bytes if held else 0, experts * 4 * shape[-1]**2),
                              (held.readers if held else 0) + 1)
    return found


def estimate_modules(checkpoint: Checkpoint, plans: dict[str, ModulePlan], *, calibrated: bool,
                     rates: MachineRates, tuned: Checkpoint | None = None) -> list[ModuleEstimate]:
    """Every module's estimate, in the order ``create`` visits them (nothing but headers is read).
    With calibration a module's peak includes its layer's Hessians, all held while the layer is
    encoded. ``tuned`` (default: ``checkpoint``) decides, with it, which modules are streamed."""
    from skillhub.compress.calibrate import layer_index, layer_order

    hessians = _hessians_of_layers(checkpoint, plans) if calibrated else {}
    estimates = []
    for name in layer_order(list(plans)):
        plan, shape = plans[name], tuple(checkpoint.shape(name))
        parts = plan.split.part_shapes(shape) if plan.split else [shape]
        layer = hessians.get(layer_index(name), {})
        held = layer.get(_hessian_key(name))
        shared = held is not None and held.readers > 1
        total, exact, seconds, peak, groups = 0, True, 0.0, 0, None
        streamed = read_in_blocks(plan, checkpoint, tuned or checkpoint, name)
        for part in parts:
            stored, part_exact, groups = _stored_bytes(plan, tuple(part))
            part_seconds, part_peak = _seconds_and_peak(plan, tuple(part), groups, rates,
                                                        calibrated and plan.role in CALIBRATED_ROLES, shared,
                                                        streamed=streamed, stored=stored)
            total = None if stored is None or total is None else total + stored
            exact, seconds, peak = exact and part_exact, seconds + part_seconds, max(peak, part_peak)
        peak += sum(hessian.bytes for hessian in layer.values())
        estimates.append(ModuleEstimate(name, plan.role, plan.operator.name, list(shape), len(parts), groups, total,
                                        exact and total is not None, seconds, peak))
    return estimates


def calibration_cost(checkpoint: Checkpoint, plans: dict[str, ModulePlan], rates: MachineRates, *, samples: int,
                     seqlen: int) -> tuple[float, int]:
    """Seconds and peak bytes of calibration itself: every layer's forward pass over the windows
    and the X^T X of each of its distinct inputs (one triangle: syrk), and at its peak the largest
    layer as stored, its Hessians in float32, one layer's activations in and out, and within one
    batch of windows its widest matrix widened to float32 and the MLP's intermediate activations."""
    from skillhub.compress.calibrate import BATCH_TOKENS, layer_index

    tokens = samples * seqlen
    stored: Counter[int] = Counter()
    params: Counter[int] = Counter()
    widest = 0
    for name in checkpoint.names():
        index = layer_index(name)
        if index is not None:
            numel = math.prod(checkpoint.shape(name))
            params[index] += numel
            stored[index] += numel * checkpoint.dtype(name).itemsize
            widest = max(widest, numel)
    hessians = {index: sum(hessian.bytes for hessian in layer.values())
                for index, layer in _hessians_of_layers(checkpoint, plans).items()}
    flops = sum(2 * tokens * params[index] + tokens * hessians.get(index, 0) / 4 for index in params)
    width = config_value(checkpoint.config, "hidden_size", "n_embd")
    intermediate = config_value(checkpoint.config, "intermediate_size") or 0
    batch_tokens = min(tokens, max(1, BATCH_TOKENS // seqlen) * seqlen)
    activations = 2 * tokens * (width or 0) * 4 + 4 * widest + 3 * batch_tokens * intermediate * 4
    peak = max((stored[index] + hessians.get(index, 0) for index in stored), default=0) + activations
    return flops / rates.matmul_flops, peak


def as_document(estimates: list[ModuleEstimate], *, floor_bytes: int,
                calibration: tuple[float, int] | None) -> dict[str, Any]:
    """The plan as ``--json`` prints it: ``peak_bytes`` is this process's resident memory now (what
    create holds before its first tensor) plus the largest working set."""
    known = [e.stored_bytes for e in estimates if e.stored_bytes is not None]
    calibration_seconds, calibration_bytes = calibration if calibration else (0.0, None)
    return {
        "modules": [asdict(e) for e in estimates],
        "totals": {
            "modules": len(estimates),
            "stored_bytes": sum(known),
            "stored_bytes_exact": all(e.bytes_exact for e in estimates),
            "seconds": sum(e.seconds for e in estimates) + calibration_seconds,
            "peak_bytes": floor_bytes + max([e.peak_bytes for e in estimates] + [calibration_bytes or 0]),
            "floor_bytes": floor_bytes,
            "calibration_seconds": calibration_seconds if calibration else None,
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
    reads the checkpoints' headers, never their weights, and writes nothing. With ``calib``, the
    calibration text is tokenized and checked as ``create`` checks it.

    Raises:
        SkillhubError: The inputs ``create_pack`` would refuse, or budget mode (``ratio``), whose
            choices come from the data.
    """
    from skillhub import config
    from skillhub.compress.pipeline import Calibration, plan_every_parameter
    from skillhub.compress.recipe import Recipe
    from skillhub.errors import SkillhubError
    from skillhub.io.checkpoint import open_checkpoint

    if ratio is not None:
        raise SkillhubError("--dry-run shows a recipe's plan; budget mode (--ratio) chooses from the data itself: "
                            "leave out --ratio")
    plans_recipe = Recipe(recipe)
    base_checkpoint = open_checkpoint(base, revision=base_revision)
    tuned_checkpoint = open_checkpoint(tuned, revision=tuned_revision)
    check_compatible(base_checkpoint, tuned_checkpoint)
    plans = plan_every_parameter(plans_recipe, base_checkpoint)
    torch_device = torch.device(device or config.default_device())
    # What create prepares before its first module, so that the calibration file gets create's
    # checks and the process floor measured next includes what create holds through every layer:
    # the tokenizer and the model built without weights (0.15 GiB at Llama-3-8B's size).
    prepared = Calibration.prepare(tuned_checkpoint, calib, samples=calib_samples, seqlen=calib_seqlen,
                                   device=torch_device)
    rates = MachineRates.measure(torch_device)
    del prepared
    estimates = estimate_modules(base_checkpoint, plans, calibrated=calib is not None, rates=rates,
                                 tuned=tuned_checkpoint)
    calibration = calibration_cost(base_checkpoint, plans, rates, samples=calib_samples,
                                   seqlen=calib_seqlen) if calib else None
    return {"recipe": plans_recipe.document.get("name"), "quantizer": "gptq" if calib else "rtn",
            **as_document(estimates, floor_bytes=rates.floor_bytes, calibration=calibration)}
