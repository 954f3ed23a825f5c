"""Budget mode: choose every module's settings to minimise output error under a byte budget.

``create --ratio R`` stores at most R x (fp16 bytes of the delta). The paper tunes ranks and
bit widths by hand; here they are chosen per module:

- norms, biases and other 1-D parameters: ``raw`` float16 (they are tiny; if the budget cannot
  hold even them, that is an error);
- embeddings and the output head: the paper's ``magnitude-prune`` keep 0.5 at 4 bits (their
  deltas are sparse and the head is what turns hidden states into answers: squeezing them to
  R of their size cost 28 points of accuracy on a `reverse` fine-tune while the linear
  layers' output error was already below the paper recipe's). Only when the budget cannot
  hold that are they pruned to the largest keep ratio that fits R of their own fp16 size. The
  word embedding a tied model shares with its head is the exception: its delta is dense (the
  head's gradient reaches every row), pruning it costs 10-17x the logit error of an SVD
  (bench/bench_families.py), so it is sized with the matrices below;
- attention and MLP matrices share the rest through a greedy marginal-gain search over
  singular directions and bit widths. For direction i of a module (singular value s_i,
  right vector v_i, calibration Hessian H of the layer input) the output error of dropping
  it is s_i^2 v_i^T H v_i; quantizing it at b bits leaves about
  s_i^2 (|u_i - u^_i|^2 v_i^T H v_i + sum_j (v_ij - v^_ij)^2 H_jj), measured by actually
  rounding u_i and v_i at each width. Each module's errors are divided by its own output
  energy tr(delta H delta^T), so the search minimises the sum of *relative* output errors:
  with absolute errors, layers with large activations starve the others, and task accuracy
  follows the worst layers (on a `reverse` fine-tune: half the mean error of the paper
  recipe, but 65% instead of 98% accuracy). Storage is per singular vector in svd-mixed, so each
  direction's cost is exact and additive. Bits stay non-increasing along the spectrum (a
  staircase of rank groups at 8/4/3/2 bits): each step either adds the next direction at 2
  bits or raises the first direction of a lower step to the next width, whichever buys the
  most error per bit, until the budget is spent.

Without calibration H = I, i.e. plain Frobenius error.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from skillhub.compress.roles import MATRIX_ROLES
from skillhub.errors import BudgetError
from skillhub.operators import EncodeContext, LayerStatistics, Split, get_operator, resolve_params, stored_bytes
from skillhub.operators.parts import part_statistics
from skillhub.numerics.quantize import quantize_rtn, storage_bits
from skillhub.numerics.svd import truncated_svd

LEVELS = (2, 3, 4, 8)  # bit widths of the staircase, lowest first
GROUP_SIZE = 128  # quantization group size of the svd-mixed modules budget mode writes
EMBEDDING_BITS = 4
PAPER_KEEP = 0.5  # the paper's embedding/head keep ratio (Table 14)


def check_ratio(ratio: float) -> None:
    """Refuse a budget ratio outside (0, 1] before any work starts."""
    if not 0 < ratio <= 1:
        raise BudgetError(f"--ratio must be in (0, 1], got {ratio}")


@dataclass
class DirectionProfile:
    """Per-direction errors and costs of one matrix, and its current staircase."""

    name: str
    drop_error: torch.Tensor  # (r,) output error of leaving direction i out
    error: dict[int, torch.Tensor]  # bits -> (r,) error left after quantizing direction i at that width
    cost: dict[int, int]  # bits -> storage bits of one direction at that width
    counts: list[int] = field(default_factory=lambda: [0] * len(LEVELS))  # directions with >= LEVELS[k] bits

    def moves(self) -> list[tuple[float, int, int]]:
        """Candidate (gain, cost, level) moves from the current staircase."""
        found = []
        limit = self.drop_error.numel()
        for level, bits in enumerate(LEVELS):
            index = self.counts[level]
            room = limit if level == 0 else self.counts[level - 1]
            if index >= room:
                continue
            before = self.drop_error[index] if level == 0 else self.error[LEVELS[level - 1]][index]
            before_cost = 0 if level == 0 else self.cost[LEVELS[level - 1]]
            gain = float(before - self.error[bits][index])
            found.append((gain, self.cost[bits] - before_cost, level))
        return found

    def groups(self) -> list[list[int]]:
        """The staircase as svd-mixed rank groups, highest bits first."""
        out = []
        for level in reversed(range(len(LEVELS))):
            above = self.counts[level + 1] if level + 1 < len(LEVELS) else 0
            if self.counts[level] - above > 0:
                out.append([self.counts[level] - above, LEVELS[level]])
        return out


def direction_profile(
    name: str, delta: torch.Tensor, statistics: LayerStatistics | None, *, max_rank: int, group_size: int,
    ctx: EncodeContext,
) -> DirectionProfile:
    """Measure what each of the top ``max_rank`` directions of ``delta`` costs and is worth."""
    matrix = delta.reshape(delta.shape[0], -1)
    if statistics is not None and statistics.transposed:
        matrix = matrix.T
    m, n = matrix.shape
    u, s, vh = truncated_svd(matrix.to(ctx.device), min(max_rank, m, n), generator=ctx.generator())
    u, s, vh = u.cpu(), s.cpu().double(), vh.cpu()
    if statistics is None:
        weight = torch.ones(vh.shape[0], dtype=torch.float64)
        diagonal = torch.ones(n, dtype=torch.float64)
        energy = float((matrix.double() ** 2).sum())
    else:
        hessian = statistics.hessian.to(torch.float64)
        weight = torch.einsum("ij,jk,ik->i", vh.double(), hessian, vh.double())
        diagonal = torch.diag(hessian)
        energy = float(torch.einsum("ij,jk,ik->", matrix.double(), hessian, matrix.double()))
    sigma2 = s**2 / max(energy, torch.finfo(torch.float64).tiny)
    errors = {}
    for bits in LEVELS:
        u_error = ((quantize_rtn(u.T, bits=bits, group_size=group_size).dequantize() - u.T) ** 2).sum(1).double()
        v_error = ((quantize_rtn(vh, bits=bits, group_size=group_size).dequantize() - vh).double() ** 2) @ diagonal
        errors[bits] = sigma2 * (u_error * weight + v_error)
    costs = {bits: storage_bits(1, m, bits, group_size) + storage_bits(1, n, bits, group_size) + 16 for bits in LEVELS}
    return DirectionProfile(name=name, drop_error=sigma2 * weight, error=errors, cost=costs)


def allocate(modules: list[DirectionProfile], budget_bits: int) -> int:
    """Greedy marginal-gain allocation of ``budget_bits`` across modules; returns bits spent."""
    spent = 0
    heap: list[tuple[float, int, int, int]] = []  # (-gain per bit, module index, version, level)
    versions = [0] * len(modules)

    def push(index: int) -> None:
        for gain, cost, level in modules[index].moves():
            if gain > 0 and cost > 0:
                heapq.heappush(heap, (-gain / cost, index, versions[index], level))

    for index in range(len(modules)):
        push(index)
    while heap:
        _, index, version, level = heapq.heappop(heap)
        if version != versions[index]:
            continue  # stale: the module changed since this move was priced
        module = modules[index]
        move = next((m for m in module.moves() if m[2] == level), None)
        if move is None:
            continue
        _, cost, _ = move
        if spent + cost > budget_bits:
            continue  # cannot afford this one; cheaper moves may still fit
        module.counts[level] += 1
        spent += cost
        versions[index] += 1
        push(index)
    return spent


def prune_size(delta: torch.Tensor, keep: float, *, ctx: EncodeContext) -> int:
    """Bytes ``magnitude-prune`` stores for ``delta`` at ``keep`` and 4 bits (by encoding it)."""
    operator = get_operator("magnitude-prune")
    params = resolve_params(operator, {"keep": keep, "bits": EMBEDDING_BITS}, where="budget")
    return stored_bytes(operator.encode(delta, params, ctx).tensors)


def prune_keep_for(delta: torch.Tensor, target_bytes: int, *, ctx: EncodeContext) -> tuple[float, int] | None:
    """Largest magnitude-prune keep ratio (to 3 significant digits) whose encoding fits ``target_bytes``."""

    def size(keep: float) -> int:
        return prune_size(delta, keep, ctx=ctx)

    low, high = 0.0, PAPER_KEEP
    if size(high) <= target_bytes:
        return high, size(high)
    for _ in range(12):
        middle = (low + high) / 2
        if size(middle) <= target_bytes:
            low = middle
        else:
            high = middle
    if low == 0.0 or size(low) > target_bytes:
        return None
    keep = math.floor(low * 1000) / 1000 or low
    return keep, size(keep)


def budget_recipe(name: str, plans: dict[str, tuple[str, dict[str, Any]]], description: str, *,
                  split_fused: bool = False) -> dict[str, Any]:
    """A recipe document that reproduces the chosen settings exactly (one rule per parameter)."""
    import re

    return {
        "name": name,
        "description": description,
        **({"split_fused": True} if split_fused else {}),
        "rules": [
            {"match": {"pattern": f"^{re.escape(parameter)}$"}, "operator": operator, "params": params}
            for parameter, (operator, params) in plans.items()
        ],
    }


# Room left for byte rounding of packed tensors: up to 6 packed tensors per rank group, 4 groups.
_ROUNDING_BITS_PER_MODULE = 6 * 4 * 8


def plan_budget(
    deltas: Any,
    *,
    roles: dict[str, str],
    numels: dict[str, int],
    ratio: float,
    splits: dict[str, Split] | None = None,
    tied: str | None = None,
    statistics: Any,
    device: torch.device,
    seed: int,
) -> tuple[dict[str, tuple[str, dict[str, Any]]], dict[str, Any]]:
    """Choose operator settings for every parameter so the pack fits ``ratio`` of the fp16 delta.

    Args:
        deltas: Iterator of TensorDelta in layer order (one pass).
        roles: Role of every parameter.
        numels: Element count of every parameter.
        splits: Parameters compressed as several matrices (see :mod:`skillhub.operators.parts`).
        tied: The word embedding a tied model shares with its head: its delta is dense, so it is
            sized like the attention and MLP matrices rather than pruned.
        ratio: Budget as a fraction of the fp16 delta bytes, in (0, 1].
        statistics: A StatisticsCursor, or None for identity weighting.
        device: Where SVDs run.
        seed: Seed for randomized SVD.

    Returns:
        ``{parameter: (operator, params)}`` and a summary for the manifest.

    Raises:
        BudgetError: The budget cannot hold the fixed parts (norms, biases) or a minimal pack.
    """
    check_ratio(ratio)
    budget_bits = int(ratio * 2 * sum(numels.values()) * 8)

    def context(name: str) -> EncodeContext:
        return EncodeContext(name=name, role=roles[name], device=device, seed=seed)

    plans, fixed_bits, profiles, held = _profile_modules(deltas, roles, splits or {}, tied, ratio, budget_bits,
                                                         statistics, context)
    minimum = sum(p.cost[LEVELS[0]] for p in profiles)
    fixed_bits += _plan_embeddings(held, plans, numels, ratio, budget_bits - fixed_bits - minimum, context)
    # Every matrix keeps at least its top direction at 2 bits; the greedy search spends the rest.
    available = budget_bits - fixed_bits - minimum
    if available < 0:
        raise BudgetError(
            f"a budget of {budget_bits // 8:,} bytes (ratio {ratio}) cannot hold even one 2-bit direction per "
            f"matrix next to the norms and embeddings ({(fixed_bits + minimum) // 8:,} bytes): raise --ratio"
        )
    for profile in profiles:
        profile.counts[0] = 1
    spent = allocate(profiles, available) + minimum
    for profile in profiles:
        plans[profile.name] = ("svd-mixed", {"groups": profile.groups(), "group_size": GROUP_SIZE})
    summary = {
        "ratio": ratio,
        "target_bytes": budget_bits // 8,
        "planned_bytes": (fixed_bits + spent) // 8,
        "weighting": "calibration" if statistics is not None else "identity (no calibration data)",
    }
    return plans, summary


def _profile(name: str, delta: torch.Tensor, statistics: LayerStatistics | None, ratio: float,
             ctx: EncodeContext) -> DirectionProfile:
    """The profile of one matrix, over as many directions as the budget could ever give it."""
    m, n = delta.shape[0], delta.numel() // delta.shape[0]
    two_bit_cost = storage_bits(1, m, 2, GROUP_SIZE) + storage_bits(1, n, 2, GROUP_SIZE) + 16
    max_rank = max(1, min(min(m, n), math.ceil(4 * ratio * 16 * m * n / two_bit_cost)))
    return direction_profile(name, delta, statistics, max_rank=max_rank, group_size=GROUP_SIZE, ctx=ctx)


def combined_profile(name: str, parts: list[DirectionProfile]) -> DirectionProfile:
    """One staircase for the matrices of a split module: its params (rank groups) apply to every
    part, so direction i means direction i of each part, and gains and costs add up. Directions
    stop where the smallest part's do (q gets no more rank than k and v in budget mode)."""
    length = min(p.drop_error.numel() for p in parts)
    return DirectionProfile(
        name=name,
        drop_error=sum(p.drop_error[:length] for p in parts),
        error={bits: sum(p.error[bits][:length] for p in parts) for bits in LEVELS},
        cost={bits: sum(p.cost[bits] for p in parts) for bits in LEVELS},
    )


def _profile_modules(
    deltas: Any, roles: dict[str, str], splits: dict[str, Split], tied: str | None, ratio: float, budget_bits: int,
    statistics: Any, context: Any,
) -> tuple[dict[str, tuple[str, dict[str, Any]]], int, list[DirectionProfile], dict[str, torch.Tensor]]:
    """One pass over the deltas: norms and biases stored raw, each attention/MLP matrix profiled
    (what each direction at each bit width gains and costs), embedding/head deltas held back
    until the rest is sized. Returns plans so far, their fixed bits, the profiles, the held deltas."""
    plans: dict[str, tuple[str, dict[str, Any]]] = {}
    fixed_bits = 0
    profiles: list[DirectionProfile] = []
    held: dict[str, torch.Tensor] = {}
    for item in deltas:
        name, role = item.name, roles[item.name]
        if not torch.any(item.delta):
            continue
        if item.delta.dim() < 2 or role not in MATRIX_ROLES:
            plans[name] = ("raw", {"dtype": "float16"})
            fixed_bits += 16 * item.delta.numel()
            if fixed_bits > budget_bits:
                raise BudgetError(
                    f"a budget of {budget_bits // 8:,} bytes (ratio {ratio}) cannot hold even the norms and "
                    f"biases stored raw ({fixed_bits // 8:,}+ bytes): raise --ratio"
                )
        elif role in ("embedding", "head") and name != tied:
            held[name] = item.delta
        else:
            layer_stats = statistics.get(name) if statistics is not None else None
            split = splits.get(name)
            if split is None:
                profiles.append(_profile(name, item.delta, layer_stats, ratio, context(name)))
            else:
                profiles.append(combined_profile(name, [
                    _profile(name, piece, part_statistics(layer_stats, split, index), ratio,
                             replace(context(name), name=f"{name}#{index}"))
                    for index, piece in enumerate(split.pieces(item.delta))]))
            plans[name] = ("svd-mixed", {})  # filled in after allocation
            fixed_bits += _ROUNDING_BITS_PER_MODULE * (len(split.sizes) if split else 1)
    return plans, fixed_bits, profiles, held


def _plan_embeddings(held: dict[str, torch.Tensor], plans: dict[str, tuple[str, dict[str, Any]]],
                     numels: dict[str, int], ratio: float, room_bits: int, context: Any) -> int:
    """Embeddings and head keep the paper's pruning when it fits in ``room_bits``, else the keep
    ratio that fits their share; returns the bits they take."""
    paper_bits = {name: 8 * prune_size(delta, PAPER_KEEP, ctx=context(name)) for name, delta in held.items()}
    if sum(paper_bits.values()) <= room_bits:
        plans.update({name: ("magnitude-prune", {"keep": PAPER_KEEP, "bits": EMBEDDING_BITS}) for name in held})
        return sum(paper_bits.values())
    spent = 0
    for name, delta in held.items():
        chosen = prune_keep_for(delta, int(ratio * 2 * numels[name]), ctx=context(name))
        if chosen is None:
            raise BudgetError(f"a ratio of {ratio} leaves no room to store any of {name}: raise --ratio")
        plans[name] = ("magnitude-prune", {"keep": chosen[0], "bits": EMBEDDING_BITS})
        spent += 8 * chosen[1]
    return spent
