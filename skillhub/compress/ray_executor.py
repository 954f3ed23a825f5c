"""``create --executor ray``: per-module encode jobs on a Ray cluster (the optional ``ray`` extra).

The driver (the machine running ``create``) reads deltas and calibration statistics and submits at
most ``--workers`` jobs at a time (:func:`skillhub.compress.workers.run_in_order`), so its memory
stays flat whatever the model's size; results come back as they complete and are written in the
serial order. Each task computes with the driver's torch thread count (LAPACK's last bits depend on
it), so the pack is byte-identical to a serial run. Cluster nodes need skillhub (and any operator
plugin the recipe names) installed, as for any Ray task.

Without ``--ray-address`` (and ``$RAY_ADDRESS``) a Ray instance is started on this machine for the
call and stopped after it; with one, ``create`` joins that cluster and leaves it running.
"""

from __future__ import annotations

import os
import socket
from concurrent.futures import Future
from dataclasses import replace

from skillhub.compress.workers import EncodeJob, EncodeResult, Executor, Threads, run_job
from skillhub.errors import SkillhubError

_CONNECT_TIMEOUT = 5.0  # seconds; Ray itself waits minutes for an address that never answers


def _run_with_threads(job: EncodeJob, threads: Threads) -> EncodeResult:
    threads.apply()  # the driver's: the same last bits as a serial run
    return run_job(job)


def check_reachable(address: str) -> None:
    """Refuse a cluster address nothing answers at, before Ray spends minutes retrying it.

    Raises:
        SkillhubError: The address is malformed or nothing listens there.
    """
    if address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise SkillhubError(f"Ray address {address!r} is not HOST:PORT (or ray://HOST:PORT, auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT):
            pass
    except OSError as exc:
        raise SkillhubError(f"no Ray cluster answers at {address}: {exc}; start one with `ray start --head` "
                            "or leave out --ray-address to run Ray on this machine") from exc


class RayExecutor(Executor):
    """Runs jobs as Ray tasks, ``workers`` at a time."""

    def __init__(self, workers: int, *, address: str | None = None) -> None:
        try:
            import ray
        except ImportError as exc:
            raise SkillhubError("--executor ray needs Ray: pip install 'skillhub[ray]'") from exc
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address is not None:
            check_reachable(address)
        self.slots = workers
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                         **({} if address else {"num_cpus": max(workers, 1)}))
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise SkillhubError(f"cannot join the Ray cluster at {address or 'a new local instance'}: {exc}") \
                    from exc
        self._threads = Threads.current()
        # Ray starts a one-CPU task's worker with OMP_NUM_THREADS=1, so its OpenMP and BLAS thread
        # pools are built for one thread before the task asks for the driver's counts; one GPTQ
        # module then came out a last bit apart. The worker is started with the driver's counts.
        counts = {"OMP_NUM_THREADS": str(self._threads.torch), "OPENBLAS_NUM_THREADS": str(self._threads.blas),
                  "MKL_NUM_THREADS": str(self._threads.blas)}
        self._task = ray.remote(num_cpus=1, max_retries=0,
                                runtime_env={"env_vars": counts})(_run_with_threads)

    def submit(self, job: EncodeJob) -> Future[EncodeResult]:
        if job.statistics is not None:  # a task may be handed the object store's read-only buffers
            job = replace(job, statistics=replace(job.statistics, exclusive=False))
        return self._task.remote(job, self._threads).future()

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
