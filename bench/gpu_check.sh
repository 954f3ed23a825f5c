#!/usr/bin/env bash
# On a machine with a CUDA device: the suite's GPU tests, then the whole-model benchmark of
# bench/bench_scale_model.py with --device cuda, its tables printed at the end.
#
#   bench/gpu_check.sh                 # 1, 4 and 32 layers of Llama-3-8B's shapes (~35 GB of disk)
#   LAYERS="1 4" bench/gpu_check.sh    # a shorter look
#
# Needs a Python with a CUDA build of torch and skillhub installed with its test extra
# (PYTHON=... to pick it). Without a device it says so and exits 1; the suite's GPU tests skip
# cleanly on every other machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
"$PYTHON" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}): nothing to check")
print(f"device: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB; "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
"$PYTHON" -m pytest -q -m gpu tests/test_gpu.py
# shellcheck disable=SC2086  # LAYERS is a list of numbers
"$PYTHON" bench/bench_scale_model.py --device cuda --layers ${LAYERS:-1 4 32} | tee "${OUT:-.}/gpu_check.txt"
