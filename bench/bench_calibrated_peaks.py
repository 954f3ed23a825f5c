"""Where a calibrated create peaks: resident memory sampled every 10 ms and attributed to the phase
running then (a layer's capture, its SVD, GPTQ's preparation, V's pass, U's side), on a checkpoint
of Llama-3-8B's shapes that bench/bench_scale_model.py wrote (issue 28).

    python bench/bench_scale_model.py --keep /work/scale --layers 1 4 32   # writes the shards
    python bench/bench_calibrated_peaks.py --keep /work/scale --layers 2   # about 6 minutes

Layer 1 is captured after layer 0 was encoded, which layer 0 alone does not show.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_scale_model  # noqa: E402

import skillhub.compress.calibrate as calibrate  # noqa: E402
import skillhub.operators.builtin.svd as svd  # noqa: E402
from skillhub import create_pack  # noqa: E402

PHASES = [(calibrate, "_replay", "capture"), (svd, "truncated_svd", "svd"), (svd, "prepare_hessian", "prepare"),
          (svd, "gptq_quantize_stacked", "V's GPTQ"), (svd.SVDMixedOperator, "quantize_group", "U's side"),
          (calibrate, "_tail_statistics", "head's inputs")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, required=True, help="bench_scale_model.py's --keep directory")
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    directory = bench_scale_model.checkpoint(args.keep, args.layers)
    running = ["other"]
    peaks: dict[str, tuple[float, float]] = {}
    for owner, name, label in PHASES:
        setattr(owner, name, _labelled(getattr(owner, name), label, running))
    done = threading.Event()
    start = time.perf_counter()

    def sample() -> None:
        with open("/proc/self/statm") as statm:
            while not done.is_set():
                statm.seek(0)
                resident = int(statm.read().split()[1]) * 4096 / 2**30
                if resident > peaks.get(running[-1], (0.0, 0.0))[0]:
                    peaks[running[-1]] = (resident, time.perf_counter() - start)
                time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()
    output = Path(tempfile.mkdtemp(prefix="skillhub-peaks-"))
    try:
        create_pack(str(directory / "base"), str(directory / "tuned"), output / "pack", name="scale", task="scale",
                    calib=str(directory / "calib.txt"), **bench_scale_model.CALIB)
    finally:
        done.set()
        shutil.rmtree(output, ignore_errors=True)
    print(f"{args.layers} layers, calibrated create: {time.perf_counter() - start:.0f} s\n")
    print("| phase | peak GiB | at s |\n|---|---:|---:|")
    for label, (resident, when) in sorted(peaks.items(), key=lambda item: -item[1][0]):
        print(f"| {label} | {resident:.2f} | {when:.0f} |")


def _labelled(function, label: str, running: list[str]):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        running.append(label)
        try:
            return function(*args, **kwargs)
        finally:
            running.pop()
    return wrapper


if __name__ == "__main__":
    main()
