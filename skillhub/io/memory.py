"""Giving freed memory back to the operating system.

glibc's malloc keeps freed blocks below its (self-raising, up to 32 MB) mmap threshold in the
heap for reuse, so after a layer's 64 MB Hessians and 235 MB deltas come and go the process can
hold gigabytes it no longer uses: measured 0.65 GB over live data after one 8B-width layer's
calibration. ``malloc_trim`` returns them between layers; :func:`large_blocks_mapped` keeps them
from piling up within one. Elsewhere (macOS, musl) both do nothing.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterator
from contextlib import contextmanager

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_DYNAMIC_CEILING = 32 << 20  # the most glibc's self-raising threshold reaches on 64-bit


@functools.cache
def _libc(function: str):  # -> the C function, or None where there is none
    try:
        # The process's own symbols (libc among them): ctypes.util.find_library would fork a
        # subprocess, a copy of what may be a multi-GB process.
        return getattr(ctypes.CDLL(None), function)
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (a few ms): call after freeing large tensors."""
    trim = _libc("malloc_trim")
    if trim is not None:
        trim(0)


@contextmanager
def large_blocks_mapped(threshold: int = 4 << 20) -> Iterator[None]:
    """Within: every allocation of ``threshold`` bytes or more gets its own mapping, which freeing
    returns to the OS at once, instead of heap space that stays with the process. Free chunks
    already in the heap are still reused first (malloc looks there before it maps anything).

    For a calibrated layer, whose forward batches and GPTQ passes free 4-32 MB tensors by the
    hundred while the layer's Hessians are held: with down_proj encoded first, 0.18-0.26 GiB
    lower peaks per phase at an 8B model's width (bench/bench_calibrated_peaks.py). Not for
    streaming, whose row blocks are fresh mappings (page faults) every time under it: the
    embedding and head took 2.5x as long. On exit the threshold is set to where glibc's own
    adjustment tops out (which setting it ends for the process).
    """
    mallopt = _libc("mallopt")
    if mallopt is None:
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, _DYNAMIC_CEILING)
