"""Interference between packs, measured before they are combined in one model.

For every parameter that two packs both change, from their decoded deltas:

- ``cosine``: cosine similarity of the two deltas (1: the same update, 0: unrelated, <0: opposed);
- ``sign_conflict``: among the entries both change, the fraction whose signs disagree
  (0.5 for unrelated updates; what TIES' sign election resolves);
- ``norm_ratio``: the larger delta norm over the smaller (one pack drowning the other);
- ``overlap``: how much the packs' input subspaces coincide, the mean squared cosine of the
  principal angles between their top-k right singular spaces (the span of an SVD pack's
  stored ``A`` factor), against ``chance`` = k / input dim for unrelated subspaces.

Summaries weight each parameter by the product of the two delta norms, so a module that
barely moves counts little. Verdict of a pair (``VERDICTS``): the packs write into the same
input directions (overlap at least ``OVERLAP_SHARED`` and at least ``CHANCE_FACTOR`` times
chance) and their updates there disagree (cosine below ``COSINE_ALIGNED``): "conflicting",
summing them moves the same features two different ways. Shared directions with aligned
updates: "aligned". Otherwise "independent": the updates act on different inputs.

The thresholds are set by measurement: on the demo's packs, pairs with overlaps of 0.16 to
0.30 (3 to 6 times chance) and cosines near 0 already lose most of their accuracy when summed
(docs/routing.md, "Routing and merging").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from skillhub.pack.format import SkillPack
from skillhub.progress import ProgressCallback, no_progress, reporting

OVERLAP_SHARED = 0.1
CHANCE_FACTOR = 3.0
COSINE_ALIGNED = 0.5
VERDICTS = {
    "conflicting": f"input subspaces overlap (>= {OVERLAP_SHARED} and >= {CHANCE_FACTOR:g}x chance) while the updates "
                   f"disagree (cosine < {COSINE_ALIGNED}): combined in one model they interfere; route between them "
                   "(`skillhub generate --route`) rather than merging",
    "aligned": f"input subspaces overlap and the updates agree (cosine >= {COSINE_ALIGNED}): they reinforce each other",
    "independent": "the updates act on different input directions: summing them interferes little",
}
_SEVERITY = ("independent", "aligned", "conflicting")


@dataclass(frozen=True)
class Measures:
    """Energy-weighted means over the parameters both packs change."""

    parameters: int
    cosine: float
    sign_conflict: float
    norm_ratio: float
    overlap: float | None  # None when no shared parameter is a matrix
    chance: float | None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}

    @property
    def verdict(self) -> str:
        shared = (self.overlap is not None and self.overlap >= OVERLAP_SHARED
                  and self.overlap >= CHANCE_FACTOR * (self.chance or 0.0))
        if not shared:
            return "independent"
        return "aligned" if self.cosine >= COSINE_ALIGNED else "conflicting"


@dataclass(frozen=True)
class PairInterference:
    """Interference of two packs, overall and per module role (attention, mlp, embedding...)."""

    packs: tuple[str, str]
    overall: Measures
    by_role: dict[str, Measures] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return self.overall.verdict

    def as_dict(self) -> dict[str, Any]:
        return {"packs": list(self.packs), "verdict": self.verdict, "overall": self.overall.as_dict(),
                "by_role": {role: m.as_dict() for role, m in self.by_role.items()}}


@dataclass(frozen=True)
class InterferenceReport:
    """Every pair of the packs, and the worst verdict among them."""

    packs: tuple[str, ...]
    pairs: tuple[PairInterference, ...]
    rank: int

    @property
    def verdict(self) -> str:
        return max((p.verdict for p in self.pairs), key=_SEVERITY.index, default="independent")

    @property
    def explanation(self) -> str:
        return VERDICTS[self.verdict]

    def as_dict(self) -> dict[str, Any]:
        return {"packs": list(self.packs), "verdict": self.verdict, "explanation": self.explanation,
                "rank": self.rank, "pairs": [p.as_dict() for p in self.pairs]}


class _Accumulator:
    """Norm-product-weighted sums of the four measures over parameters."""

    def __init__(self) -> None:
        self.count = 0
        self.weight = self.cosine = self.sign = self.ratio = 0.0
        self.matrix_weight = self.overlap = self.chance = 0.0

    def add(self, weight: float, cosine: float, sign: float, ratio: float, overlap: float | None,
            chance: float | None) -> None:
        self.count += 1
        self.weight += weight
        self.cosine += weight * cosine
        self.sign += weight * sign
        self.ratio += weight * ratio
        if overlap is not None:
            self.matrix_weight += weight
            self.overlap += weight * overlap
            self.chance += weight * chance

    def measures(self) -> Measures:
        w = self.weight or 1.0
        mw = self.matrix_weight
        return Measures(parameters=self.count, cosine=self.cosine / w, sign_conflict=self.sign / w,
                        norm_ratio=self.ratio / w, overlap=self.overlap / mw if mw else None,
                        chance=self.chance / mw if mw else None)


def input_subspace(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal basis (in_features x k) of the top-k right singular vectors of a matrix delta."""
    matrix = delta.reshape(delta.shape[0], -1)
    k = min(rank, *matrix.shape)
    if min(matrix.shape) <= 1024:
        _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        return vh[:k].T
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        _, _, v = torch.svd_lowrank(matrix, q=k + 8, niter=4)
    finally:
        torch.random.set_rng_state(generator_state)
    return v[:, :k]


def _pair_measures(a: torch.Tensor, b: torch.Tensor, basis_a: torch.Tensor | None,
                   basis_b: torch.Tensor | None) -> tuple[float, float, float, float, float | None, float | None]:
    norm_a, norm_b = float(a.norm()), float(b.norm())
    weight = norm_a * norm_b
    cosine = float((a * b).sum()) / weight if weight else 0.0
    both = (a != 0) & (b != 0)
    shared = int(both.sum())
    sign = float((torch.sign(a[both]) != torch.sign(b[both])).sum()) / shared if shared else 0.0
    ratio = max(norm_a, norm_b) / min(norm_a, norm_b) if min(norm_a, norm_b) else float("inf")
    overlap = chance = None
    if basis_a is not None and basis_b is not None:
        k = min(basis_a.shape[1], basis_b.shape[1])
        overlap = float((basis_a[:, :k].T @ basis_b[:, :k]).pow(2).sum()) / k
        chance = k / basis_a.shape[0]
    return weight, cosine, sign, ratio, overlap, chance


def interference(packs: Sequence[SkillPack], *, labels: Sequence[str] | None = None, rank: int = 8,
                 progress: ProgressCallback = no_progress) -> InterferenceReport:
    """Measure every pair of ``packs`` (at least two) on the parameters they both change.

    Args:
        packs: Opened packs of one base model.
        labels: How to name each pack in the report (default: its name).
        rank: k, the size of the input subspaces compared.
        progress: Called as ``progress("interference", done, total)``.
    """
    if len(packs) < 2:
        raise ValueError("interference needs at least two packs")
    for pack in packs:
        pack.check_decodable()
    names = tuple(labels) if labels else tuple(p.name for p in packs)
    pairs = [(i, j) for i in range(len(packs)) for j in range(i + 1, len(packs))]
    overall = {pair: _Accumulator() for pair in pairs}
    by_role: dict[tuple[int, int], dict[str, _Accumulator]] = {pair: {} for pair in pairs}
    modules = sorted({m for p in packs for m in p.modules})
    for module in reporting(modules, progress, "interference", len(modules)):
        holders = [i for i, p in enumerate(packs) if module in p.modules]
        if len(holders) < 2:
            continue
        deltas = {i: packs[i].decode(module).to(torch.float32) for i in holders}
        bases = {i: input_subspace(d, rank) if d.dim() >= 2 else None for i, d in deltas.items()}
        role = packs[holders[0]].modules[module].role
        for i, j in pairs:
            if i in deltas and j in deltas:
                values = _pair_measures(deltas[i], deltas[j], bases[i], bases[j])
                if values[0] == 0.0:
                    continue  # one of the deltas is zero here: nothing to interfere
                overall[(i, j)].add(*values)
                by_role[(i, j)].setdefault(role, _Accumulator()).add(*values)
    return InterferenceReport(
        packs=names,
        pairs=tuple(PairInterference(packs=(names[i], names[j]), overall=overall[(i, j)].measures(),
                                     by_role={r: a.measures() for r, a in sorted(by_role[(i, j)].items())})
                    for i, j in pairs),
        rank=rank,
    )
