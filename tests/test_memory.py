"""Freed memory leaves the process: large blocks mapped on their own within a calibrated layer."""

from __future__ import annotations

import ctypes
import platform

import psutil
import pytest
import torch

from skillhub.io.memory import large_blocks_mapped, return_freed_memory


def _glibc() -> bool:
    try:
        return platform.libc_ver()[0] == "glibc" and bool(ctypes.CDLL(None).mallopt)
    except (OSError, AttributeError):
        return False


def _resident_after_freeing_blocks_between_live_ones() -> int:
    """Bytes still resident after 64 blocks of 8 MB, each followed by a small tensor that stays
    alive (so the heap cannot shrink from its top), are freed."""
    before = psutil.Process().memory_info().rss
    blocks, keep = [], []
    for _ in range(64):
        blocks.append(torch.ones(2 << 20))  # 8 MB, written: resident
        keep.append(torch.ones(16 << 10))  # 64 KB, kept
    del blocks
    return psutil.Process().memory_info().rss - before


@pytest.mark.skipif(not _glibc(), reason="glibc's mallopt")
def test_blocks_freed_within_a_calibrated_layer_leave_the_process() -> None:
    block = torch.ones(7 << 20)  # 28 MB, mapped: freeing it raises glibc's threshold to 28 MB
    del block
    return_freed_memory()  # free heap pages other tests left are not resident: the blocks' pages count
    without = _resident_after_freeing_blocks_between_live_ones()
    assert without > 256 << 20  # the 8 MB blocks came from the heap, and stay
    return_freed_memory()
    with large_blocks_mapped():
        within = _resident_after_freeing_blocks_between_live_ones()
    assert within < 64 << 20, f"{within / 2**20:.0f} MB stayed resident"
