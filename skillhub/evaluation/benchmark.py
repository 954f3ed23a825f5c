"""``skillhub bench compress``: ways of storing a fine-tune's linear-layer deltas, at equal bytes.

Every method gets the same byte budget, ``ratio`` x the fp16 bytes, for the attention and MLP
matrices (embeddings, head and norms are not part of the comparison). Each method is scored
by its held-out relative output error, ``||dW x - dW^ x|| / ||dW x||`` per layer, averaged
over layers. The held-out inputs x are the second half of the calibration windows; the first
half is what GPTQ and budget mode are fitted on. Without calibration data x is white (H = I),
i.e. the error is the relative Frobenius error of the weights.

Methods:

- ``paper``: svd-mixed with the paper's rank groups (8/3/2 bits for MLP, 8/2 for attention),
  their ranks scaled until each matrix fills the budget; GPTQ with calibration (Eq. 8);
- ``budget``: budget mode's per-direction allocation across all matrices (GPTQ);
- ``svd-mixed-rtn``: the ``paper`` layout quantized by round-to-nearest only;
- ``lowrank-fp16``: truncated SVD factors in float16 (LoRA extraction), rank filling the budget;
- ``prune-fp16``: magnitude pruning of the delta with float16 values (TIES/DARE-style), keep
  ratio filling the budget;
- ``bitdelta``: the sign of every entry (1 bit) and one float16 scale per row (BitDelta without
  scale distillation); its size is fixed at about 1/16 and is reported as it is.

With ``eval_file`` each method's matrices are patched into the fine-tuned model (everything
else keeps the fine-tuned weights) and scored by exact match; retention is relative to the
uncompressed delta, i.e. the fine-tuned model itself.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from skillhub import config
from skillhub.compress.budget import GROUP_SIZE, check_ratio, plan_budget
from skillhub.compress.calibrate import StatisticsCursor, capture_statistics, layer_order, load_for_calibration
from skillhub.compress.delta import check_compatible, iter_deltas
from skillhub.compress.windows import CalibrationSet, build_calibration_set
from skillhub.errors import SkillhubError
from skillhub.scoring.datasets import load_eval_set
from skillhub.scoring.scores import exact_match
from skillhub.io.checkpoint import Checkpoint, open_checkpoint
from skillhub.operators import EncodeContext, LayerStatistics, encode_module, get_operator, resolve_params
from skillhub.numerics.bitpack import packed_nbytes
from skillhub.numerics.svd import svd_mixed_bytes
from skillhub.operators.builtin.svd import resolve_rank_groups
from skillhub.progress import ProgressCallback, no_progress, quiet_transformers, reporting
from skillhub.compress.recipe import PAPER_RECIPE, Recipe

METHODS = ("paper", "budget", "svd-mixed-rtn", "lowrank-fp16", "prune-fp16", "bitdelta")
DEFAULT_RATIO = 1 / 16
PAPER_GROUPS = {rule["match"]["role"]: rule["params"]["groups"]  # the attention and MLP rules
                for rule in PAPER_RECIPE["rules"] if rule["operator"] == "svd-mixed" and "tied" not in rule["match"]}


def paper_groups_for(role: str, rows: int, cols: int, target_bytes: int) -> list[tuple[int, int]]:
    """The paper's rank groups for ``role``, scaled as far as ``target_bytes`` allows."""
    groups = PAPER_GROUPS[role]
    low, high = 1e-6, 4096.0 / min(rows, cols) * 4
    for _ in range(40):  # bisection on the scale of the 4096-wide reference ranks
        middle = (low + high) / 2
        fits = svd_mixed_bytes(rows, cols, resolve_rank_groups(groups, min(rows, cols), 4096 / middle),
                               GROUP_SIZE) <= target_bytes
        low, high = (middle, high) if fits else (low, middle)
    return resolve_rank_groups(groups, min(rows, cols), 4096 / low)


def _svd_mixed(delta: torch.Tensor, groups: list[tuple[int, int]], quantizer: str, ctx: EncodeContext):
    operator = get_operator("svd-mixed")
    params = resolve_params(operator, {"groups": [list(g) for g in groups], "group_size": GROUP_SIZE,
                                       "quantizer": quantizer}, where="bench")
    result = encode_module(operator, delta, params, ctx)
    return result.decoded, result.stored_bytes


def lowrank_at(delta: torch.Tensor, target_bytes: int, ctx: EncodeContext) -> tuple[torch.Tensor, int]:
    """Truncated SVD with float16 factors, the rank filling ``target_bytes``: (approximation, bytes)."""
    rows, cols = delta.shape
    operator = get_operator("lowrank")
    params = resolve_params(operator, {"rank": max(1, target_bytes // (2 * (rows + cols)))}, where="bench")
    result = encode_module(operator, delta, params, ctx)
    return result.decoded, result.stored_bytes


def prune_at(delta: torch.Tensor, target_bytes: int, ctx: EncodeContext) -> tuple[torch.Tensor, int]:
    """Magnitude pruning with float16 values, the kept fraction filling ``target_bytes``."""
    operator = get_operator("magnitude-prune")

    def encode(keep: float):
        return encode_module(operator, delta, resolve_params(operator, {"keep": keep, "bits": 16}, where="bench"), ctx)

    # Each kept value costs its 2 bytes plus at most 4 of index (a gap of up to 32 bits), so the
    # kept fraction lies within a factor of 3; the index size depends on the data, so bisect by encoding.
    numel = delta.numel()
    low, high = max(1.0 / numel, target_bytes / (6 * numel)), min(1.0, max(1.0 / numel, target_bytes / (2 * numel)))
    for _ in range(14):
        middle = (low + high) / 2
        low, high = (middle, high) if encode(middle).stored_bytes <= target_bytes else (low, middle)
    result = encode(low)
    return result.decoded, result.stored_bytes


def bitdelta_approximation(delta: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The sign of every entry and one float16 scale per row (its size is fixed)."""
    rows, cols = delta.shape
    scale = delta.abs().mean(dim=1, keepdim=True).to(torch.float16).float()
    approximation = torch.where(delta >= 0, scale, -scale)
    return approximation, packed_nbytes(rows * cols, 1) + 2 * rows


def _relative_error(delta: torch.Tensor, approximation: torch.Tensor, stats: LayerStatistics | None) -> float:
    residual = (delta - approximation).double()
    if stats is None:
        return float(residual.norm() / delta.double().norm())
    hessian = stats.hessian.double()  # accumulated in float32 (calibrate.py)
    if stats.transposed:
        residual, reference = residual.T, delta.double().T
    else:
        reference = delta.double()
    error = torch.einsum("ij,jk,ik->", residual, hessian, residual)
    energy = torch.einsum("ij,jk,ik->", reference, hessian, reference)
    return float(torch.sqrt(torch.clamp(error, min=0) / energy))


def compare_compression(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    *,
    ratio: float = DEFAULT_RATIO,
    calib: str | os.PathLike[str] | None = None,
    calib_samples: int = 64,
    calib_seqlen: int = 256,
    eval_file: str | os.PathLike[str] | None = None,
    device: str | None = None,
    seed: int = 0,
    progress: ProgressCallback = no_progress,
) -> dict[str, Any]:
    """Compress the attention/MLP deltas of ``tuned - base`` with every method at ``ratio`` and score them.

    Returns:
        ``{"ratio", "delta_fp16_bytes", "error_measure", "methods": [{"method", "bytes", "ratio",
        "heldout_relative_error", ["accuracy", "retention"]}], ["tuned_accuracy"]}``.

    Raises:
        SkillhubError: Bad inputs (ratio outside (0, 1], calibration file too short, ...).
    """
    check_ratio(ratio)
    base_ckpt, tuned_ckpt = open_checkpoint(base), open_checkpoint(tuned)
    check_compatible(base_ckpt, tuned_ckpt)
    roles = Recipe("paper")
    linear = [n for n in layer_order(base_ckpt.names())
              if len(base_ckpt.shape(n)) == 2
              and roles.role(n, model_type=base_ckpt.model_type, ndim=2) in ("attention", "mlp")]
    role_of = {n: roles.role(n, model_type=base_ckpt.model_type, ndim=2) for n in linear}
    examples = load_eval_set(eval_file) if eval_file is not None else None
    device = device or config.default_device()
    halves = _CalibrationHalves.prepare(tuned_ckpt, calib, samples=calib_samples, seqlen=calib_seqlen, device=device)
    torch_device = torch.device(device)
    budget_plans, _ = plan_budget(
        iter_deltas(base_ckpt, tuned_ckpt, names=linear), roles=role_of,
        numels={n: math.prod(base_ckpt.shape(n)) for n in linear}, ratio=ratio, statistics=halves.cursor("fit"),
        device=torch_device, seed=seed,
    )
    fit_cursor, heldout_cursor = halves.cursor("fit"), halves.cursor("heldout")
    stored = {m: 0 for m in METHODS}
    errors: dict[str, list[float]] = {m: [] for m in METHODS}
    patches: dict[str, dict[str, torch.Tensor]] = {m: {} for m in METHODS}
    for item in reporting(iter_deltas(base_ckpt, tuned_ckpt, names=linear), progress, "bench", len(linear)):
        fit = fit_cursor.get(item.name) if fit_cursor else None
        # Every method encodes against these statistics: none may overwrite their Hessian.
        ctx = EncodeContext(name=item.name, role=role_of[item.name], device=torch_device, seed=seed,
                            calibration=replace(fit, exclusive=False) if fit is not None else None)
        heldout_stats = heldout_cursor.get(item.name) if heldout_cursor else None
        for method, (approximation, nbytes) in _every_method(item.delta, ratio, ctx, budget_plans).items():
            stored[method] += nbytes
            errors[method].append(_relative_error(item.delta, approximation, heldout_stats))
            if examples is not None:
                patches[method][item.name] = base_ckpt.read(item.name).float() + approximation
    delta_bytes = 2 * sum(math.prod(base_ckpt.shape(n)) for n in linear)
    rows = [{"method": method, "bytes": stored[method], "ratio": stored[method] / delta_bytes,
             "heldout_relative_error": sum(errors[method]) / len(errors[method])} for method in METHODS]
    report: dict[str, Any] = {
        "ratio": ratio,
        "matrices": len(linear),
        "delta_fp16_bytes": delta_bytes,
        "error_measure": "held-out calibration inputs" if calib is not None else "weights (no calibration: H = I)",
        "quantizer": "gptq" if calib is not None else "rtn (no calibration)",
        "methods": rows,
    }
    if examples is not None:
        report.update(_accuracies(tuned_ckpt, examples, patches, rows))
    return report


@dataclass
class _CalibrationHalves:
    """Calibration windows split in two: the first half fits GPTQ and budget mode, the second
    measures the error on inputs neither has seen (none without calibration: H = I)."""

    fit: CalibrationSet | None = None
    heldout: CalibrationSet | None = None
    model: Any = None

    @classmethod
    def prepare(cls, tuned: Checkpoint, calib: str | os.PathLike[str] | None, *, samples: int, seqlen: int,
                device: str) -> _CalibrationHalves:
        if calib is None:
            return cls()
        if samples < 2:
            raise SkillhubError("--calib-samples must be at least 2: half fits GPTQ, half is held out")
        from transformers import AutoTokenizer

        windows = build_calibration_set(calib, AutoTokenizer.from_pretrained(tuned.path), samples=samples,
                                        seqlen=seqlen)
        half = samples // 2
        return cls(CalibrationSet(windows.input_ids[:half], windows.source),
                   CalibrationSet(windows.input_ids[half:], windows.source),
                   load_for_calibration(tuned, device=device))

    def cursor(self, which: str) -> StatisticsCursor | None:
        windows = getattr(self, which)
        return StatisticsCursor(capture_statistics(self.model, windows)) if windows is not None else None


def _every_method(delta: torch.Tensor, ratio: float, ctx: EncodeContext,
                  budget_plans: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, tuple[torch.Tensor, int]]:
    """Every method's approximation of one matrix delta at ``ratio`` of its fp16 bytes, and its bytes."""
    target = int(ratio * 2 * delta.numel())
    paper = paper_groups_for(ctx.role, *delta.shape, target)
    runs: dict[str, Callable[[], tuple[torch.Tensor, int]]] = {
        "paper": lambda: _svd_mixed(delta, paper, "auto", ctx),
        "budget": lambda: _svd_mixed(delta, [tuple(g) for g in budget_plans[ctx.name][1]["groups"]], "auto", ctx),
        "svd-mixed-rtn": lambda: _svd_mixed(delta, paper, "rtn", ctx),
        "lowrank-fp16": lambda: lowrank_at(delta, target, ctx),
        "prune-fp16": lambda: prune_at(delta, target, ctx),
        "bitdelta": lambda: bitdelta_approximation(delta),
    }
    return {method: run() for method, run in runs.items()}


def _accuracies(tuned: Checkpoint, examples: list[dict[str, str]], patches: dict[str, dict[str, torch.Tensor]],
                rows: list[dict[str, Any]]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer


    tokenizer = AutoTokenizer.from_pretrained(tuned.path)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(tuned.path, dtype=torch.float32)
    tuned_accuracy = exact_match(model, tokenizer, examples)
    parameters = dict(model.named_parameters())
    for row in rows:
        with torch.no_grad():
            for name, weight in patches[row["method"]].items():
                parameters[name].copy_(weight)
        row["accuracy"] = exact_match(model, tokenizer, examples)
        row["retention"] = row["accuracy"] / tuned_accuracy if tuned_accuracy else 0.0
    return {"tuned_accuracy": tuned_accuracy}
