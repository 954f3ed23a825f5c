"""Freed memory leaves the process: large blocks mapped on their own within a calibrated layer."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import subprocess
import sys
from pathlib import Path

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


def _measure(mapped: bool) -> int:
    block = torch.ones(7 << 20)  # 28 MB, mapped: freeing it raises glibc's threshold to 28 MB
    del block
    return_freed_memory()
    with large_blocks_mapped() if mapped else contextlib.nullcontext():
        return _resident_after_freeing_blocks_between_live_ones()


def _resident_in_a_fresh_process(mapped: bool) -> int:
    # Free chunks left in a heap are reused before any new mapping, whatever the threshold, so
    # each measurement runs where no test (nor the other measurement) has left any.
    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, __file__, "mapped" if mapped else "heap"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path}, check=True)
    return int(done.stdout)


@pytest.mark.skipif(not _glibc(), reason="glibc's mallopt")
def test_blocks_freed_within_a_calibrated_layer_leave_the_process() -> None:
    assert _resident_in_a_fresh_process(mapped=False) > 256 << 20  # from the heap, and they stay
    within = _resident_in_a_fresh_process(mapped=True)
    assert within < 64 << 20, f"{within / 2**20:.0f} MB stayed resident"


if __name__ == "__main__":
    print(_measure(mapped=sys.argv[1] == "mapped"))
