"""The ``keep`` largest magnitudes of a tensor seen a block at a time: an exact threshold by radix
selection, in two passes over the blocks and a few hundred kilobytes of counts.

A non-negative float32's bit pattern, read as an integer, orders as its value does. The first
pass counts the magnitudes by their top 16 bits and finds the bucket the keep-th largest falls
in; the second counts that bucket's members by their low 16 bits, which pins the value itself.
The answer is the one ``torch.kthvalue`` gives on the whole tensor, without ever holding it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

_HALF = 16  # bits per radix pass
_BUCKETS = 1 << _HALF


@dataclass(frozen=True)
class MagnitudeThreshold:
    """Keep every element with ``|x| > value``, and the first ``ties`` (in order) with ``|x| == value``."""

    value: float
    ties: int


def magnitude_bits(block: torch.Tensor) -> torch.Tensor:
    """|block| as int32 bit patterns (ordered as the magnitudes are)."""
    return block.abs().view(torch.int32)


def _locate(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """(bucket, elements in higher buckets) of the rank-th largest element (1-based) of a histogram."""
    from_top = counts.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor(rank, dtype=from_top.dtype)))
    bucket = counts.numel() - 1 - position
    return bucket, int(from_top[position]) - int(counts[bucket])


def magnitude_threshold(blocks: Iterable[torch.Tensor], keep: int) -> MagnitudeThreshold:
    """The threshold that keeps exactly the ``keep`` largest |x| of finite float32 ``blocks``
    (ties broken by position, the earliest first, as ``magnitude-prune`` breaks them).

    Args:
        blocks: Iterated twice, yielding the same blocks in the same order each time.
        keep: How many to keep, from 1 to the element count.

    Raises:
        ValueError: ``keep`` is out of range.
    """
    high = torch.zeros(_BUCKETS, dtype=torch.int64)
    for block in blocks:
        high += torch.bincount(magnitude_bits(block).reshape(-1) >> _HALF, minlength=_BUCKETS)
    total = int(high.sum())
    if not 1 <= keep <= total:
        raise ValueError(f"cannot keep {keep} of {total} elements")
    bucket, above = _locate(high, keep)
    low = torch.zeros(_BUCKETS, dtype=torch.int64)
    for block in blocks:
        bits = magnitude_bits(block).reshape(-1)
        low += torch.bincount(bits[(bits >> _HALF) == bucket] & (_BUCKETS - 1), minlength=_BUCKETS)
    position, above_in_bucket = _locate(low, keep - above)
    pattern = torch.tensor([(bucket << _HALF) | position], dtype=torch.int32)
    return MagnitudeThreshold(value=float(pattern.view(torch.float32)), ties=keep - above - above_in_bucket)
