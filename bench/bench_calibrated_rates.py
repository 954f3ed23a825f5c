"""The calibrated path's operations timed alone at Llama-3-8B's sizes, against --dry-run's matrix
product rate: the profile behind calibration's cost in bench/bench_scale_model.py (issue 28).

    python bench/bench_calibrated_rates.py      # about a minute on 2 cores
"""

from __future__ import annotations

import time

import torch

from skillhub.compress.estimate import MachineRates
from skillhub.compress.input_statistics import _accumulate_gram
from skillhub.numerics.gptq import _factor

WIDTH, MLP, TOKENS = 4096, 14336, 1024  # a calibration batch: calibrate.BATCH_TOKENS


def timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(0)
    rates = MachineRates.measure(torch.device("cpu"))
    print(f"--dry-run's matrix product rate: {rates.matmul_flops / 1e9:.0f} GFLOPS")
    for n in (2048, WIDTH):  # GPTQ's factorization: potrf in place
        a = torch.randn(n, n, generator=generator)
        seconds = timed(_factor, a @ a.T + n * torch.eye(n))
        print(f"potrf {n}: {seconds:.2f} s, {n**3 / 3 / seconds / 1e9:.0f} GFLOPS")
    for n in (WIDTH, MLP):  # a batch's inputs into a Hessian: syrk
        seconds = timed(_accumulate_gram, torch.zeros(n, n), torch.randn(TOKENS, n, generator=generator))
        print(f"syrk {TOKENS} x {n}: {seconds:.2f} s, {TOKENS * n * n / seconds / 1e9:.0f} GFLOPS")
    weight, x = torch.randn(MLP, WIDTH, generator=generator), torch.randn(TOKENS, WIDTH, generator=generator)
    seconds = timed(torch.nn.functional.linear, x, weight)  # the forward pass: an MLP projection
    print(f"linear {TOKENS} x {WIDTH} -> {MLP}: {seconds:.2f} s, {2 * TOKENS * WIDTH * MLP / seconds / 1e9:.0f} GFLOPS")
    a = torch.randn(WIDTH, WIDTH, generator=generator)
    print(f"matrix product {WIDTH}: {2 * WIDTH**3 / timed(torch.mm, a, a) / 1e9:.0f} GFLOPS")


if __name__ == "__main__":
    main()
