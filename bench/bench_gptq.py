"""Our GPTQ against the gptqmodel 7.6.0 oracle on the same matrix and calibration, in one process.

    pip install -c constraints.txt -e '.[oracle]'   # or any env with gptqmodel==7.6.0
    python bench/bench_gptq.py [--rows 1024] [--cols 4096] [--samples 2048] [--repeats 3]

Reports the median wall time of each (runs alternate, after one warm-up each), their ratio
(ours / oracle; target <= 1.0), and the relative calibration output error of each
(||(W - W^) X|| / ||W X||) with their relative difference (target <= 1%).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gptq_oracle import gptq_oracle  # noqa: E402

from skillhub.numerics.gptq import gptq_quantize, output_error  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(args.rows, args.cols, generator=gen)
    inputs = torch.randn(args.samples, args.cols, generator=gen) @ (torch.randn(args.cols, args.cols, generator=gen) / 64)
    hessian = 2 * inputs.T @ inputs / args.samples

    def ours() -> torch.Tensor:
        return gptq_quantize(weight, hessian, bits=args.bits, group_size=args.group_size).dequantize()

    def oracle() -> torch.Tensor:
        codes, scales, zeros = gptq_oracle(weight, hessian, bits=args.bits, group_size=args.group_size)
        groups = torch.arange(args.cols) // args.group_size
        return (codes.float() - zeros[:, groups]) * scales.to(torch.float16).float()[:, groups]

    results = {"skillhub": ours(), "gptqmodel": oracle()}  # warm-up, and the outputs compared below
    times: dict[str, list[float]] = {"skillhub": [], "gptqmodel": []}
    for _ in range(args.repeats):
        for label, run in (("skillhub", ours), ("gptqmodel", oracle)):
            start = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - start)
    reference = output_error(weight, torch.zeros_like(weight), hessian)
    errors = {label: output_error(weight, approx, hessian) / reference for label, approx in results.items()}
    median = {label: statistics.median(t) for label, t in times.items()}
    print(f"GPTQ {args.rows}x{args.cols}, {args.samples} calibration vectors, {args.bits} bits, group {args.group_size}, "
          f"2 threads, median of {args.repeats}")
    print("| implementation | wall | relative output error |")
    print("|---|---:|---:|")
    for label in ("skillhub", "gptqmodel"):
        print(f"| {label} | {median[label]:.2f} s | {errors[label]:.5f} |")
    print(f"\ntime ratio skillhub/gptqmodel: {median['skillhub'] / median['gptqmodel']:.2f} (target <= 1.0)")
    difference = abs(errors["skillhub"] - errors["gptqmodel"]) / errors["gptqmodel"]
    print(f"error difference: {difference:.2%} (target <= 1%); identical codes: "
          f"{torch.equal(results['skillhub'], results['gptqmodel'])}")


if __name__ == "__main__":
    main()
