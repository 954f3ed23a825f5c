"""Where modules are encoded: in this process, in a pool of worker processes (``create --workers N``),
or on a Ray cluster (``create --executor ray``).

Every executor takes the same :class:`EncodeJob` (one module's delta, its plan and its layer
statistics) and gives back the same :class:`EncodeResult`; ``create_pack`` submits a layer's modules
largest first, keeps at most as many deltas in flight as there are workers (memory stays flat), and
writes results in the serial order, so a pack's bytes never depend on the executor. A module whose
delta is too large to hold whole is encoded in this process instead, a row block at a time
(:func:`run_streamed`), with the same result.

Bit-identity needs more than the write order: LAPACK's eigh and Cholesky give different last bits
with different thread counts (measured), so every worker computes with the thread count of the
process that started it. The speed-up therefore comes from overlapping one module's stretches that
use one core (GPTQ's column loop, bit packing, decoding) with another's multi-threaded BLAS.

Tensors reach local workers through shared memory (torch.multiprocessing); nothing a worker
exchanges is read from or written to the user's files.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import torch

from skillhub.compress.delta import RowBlocks
from skillhub.errors import OperatorError, SkillhubError
from skillhub.operators import EncodeContext, LayerStatistics, Operator, Split, encode_module, get_operator


@dataclass(frozen=True)
class EncodeJob:
    """One module to encode, self-contained (operators are looked up by name where it runs)."""

    name: str
    role: str
    operator: str
    params: dict[str, Any]
    delta: torch.Tensor
    statistics: LayerStatistics | None
    split: Split | None
    seed: int
    device: str


@dataclass(frozen=True)
class EncodeResult:
    """What the pack keeps of an encoded module (the decoded tensor stays where it was made)."""

    name: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    error_norm: float
    delta_norm: float


def run_job(job: EncodeJob) -> EncodeResult:
    """Encode one module: what every executor runs."""
    operator = get_operator(job.operator)
    device = torch.device(job.device)
    ctx = EncodeContext(name=job.name, role=job.role, device=device, seed=job.seed, calibration=job.statistics)
    result = encode_module(operator, job.delta, job.params, ctx, device=device, split=job.split)
    return EncodeResult(job.name, result.encoded.tensors, result.encoded.meta, result.error_norm, result.delta_norm)


def run_streamed(operator: Operator, params: dict[str, Any], blocks: RowBlocks, ctx: EncodeContext) -> EncodeResult:
    """Encode one module from its delta's row blocks (``encode_blocks``), in this process whatever the
    executor: the module is streamed because it is too large to hold whole, let alone to ship.

    Raises:
        OperatorError: The operator refused the input, or did not read the whole delta.
    """
    try:
        result = operator.encode_blocks(blocks, params, ctx)
    except ValueError as exc:  # operators' documented way to refuse an input
        raise OperatorError(f"operator {operator.name} cannot encode {ctx.name}: {exc}") from exc
    if blocks.squared_norm is None:
        raise OperatorError(f"operator {operator.name} returned before reading all of {ctx.name}'s delta")
    return EncodeResult(ctx.name, result.encoded.tensors, result.encoded.meta, result.squared_error**0.5,
                        blocks.squared_norm**0.5)


def check_workers(workers: int) -> None:
    """Raises:
        SkillhubError: ``workers`` is not a positive number.
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise SkillhubError(f"--workers must be a whole number >= 1 (1: encode in this process), got {workers!r}")


class Executor:
    """Runs jobs in this process, one at a time (``--workers 1``)."""

    slots = 1

    def submit(self, job: EncodeJob) -> Future[EncodeResult]:
        future: Future[EncodeResult] = Future()
        try:
            future.set_result(run_job(job))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future, as a pool would
            future.set_exception(exc)
        return future

    def close(self) -> None:
        """Release whatever the executor holds."""


@dataclass(frozen=True)
class Threads:
    """How many threads this process computes with: torch's, and SciPy's BLAS/LAPACK's (GPTQ's
    in-place factorizations). A worker takes its parent's: LAPACK's last bits depend on them."""

    torch: int
    blas: int

    @classmethod
    def current(cls) -> Threads:
        from threadpoolctl import threadpool_info

        importlib.import_module("scipy.linalg")  # loads SciPy's BLAS, so that threadpoolctl sees it

        blas = [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]
        return cls(torch.get_num_threads(), max(blas, default=1))

    def apply(self) -> None:
        """Use these counts in this process (Ray workers start with one thread each)."""
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(self.torch)
        threadpool_limits(limits=self.blas, user_api="blas")


def _init_worker(threads: Threads) -> None:
    threads.apply()


class ProcessExecutor(Executor):
    """Runs jobs in ``workers`` spawned processes on this machine."""

    def __init__(self, workers: int) -> None:
        import torch.multiprocessing as multiprocessing  # registers shared-memory transfer of tensors

        self.slots = workers
        # Workers start when first needed and read their environment then. Their OpenMP threads
        # sleep instead of spinning while they wait (they share the cores with each other): measured
        # on 2 cores, 2 workers spinning took 1.3x (RTN) to 1.8x (GPTQ) a serial run's time.
        self._saved_policy = os.environ.get("OMP_WAIT_POLICY")
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_init_worker, initargs=(Threads.current(),))

    def submit(self, job: EncodeJob) -> Future[EncodeResult]:
        return self._pool.submit(run_job, job)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._saved_policy is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = self._saved_policy


def run_in_order(executor: Executor, jobs: Iterator[Callable[[], EncodeJob | None]],
                 on_result: Callable[[EncodeResult], None]) -> None:
    """Build and run ``jobs`` (each a thunk: it reads its delta when called; None skips it) with at
    most ``executor.slots`` in flight, handing results to ``on_result`` as they complete."""
    running: set[Future[EncodeResult]] = set()
    try:
        for make in jobs:
            if len(running) >= executor.slots:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    on_result(future.result())
            job = make()
            if job is not None:
                running.add(executor.submit(job))
            job = None  # not held while the next delta is read
        for future in wait(running).done:
            on_result(future.result())
    except BrokenProcessPool as exc:
        raise SkillhubError(
            "a worker process died before finishing its module (out of memory, or a script that calls "
            "create_pack with workers > 1 outside an `if __name__ == \"__main__\":` block, which worker "
            f"processes re-run on start): {exc}"
        ) from exc
