"""Benchmark `skillhub create`: wall time, peak RSS and params/s as the layer count doubles.

Every measurement runs in a fresh Python process so its peak RSS is its own. Next to each
`create` run, in the same invocation, the script measures two references in their own
processes:

- "imports": a process that imports torch/transformers/skillhub and does nothing else
  (the floor every run pays);
- "whole delta": loading both state dicts with safetensors' load_file and materialising
  the float32 delta of every tensor at once, which is what a non-streaming extraction holds.

`create` should stay flat as layers double; "whole delta" grows with the model.

    python bench/bench_create.py [--layers 4 8 16] [--hidden 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD_PRELUDE = """
import json, resource, sys, time
import torch, transformers, skillhub.compress.pipeline
torch.set_num_threads(2)
"""

CREATE = CHILD_PRELUDE + """
from skillhub.compress.pipeline import create_pack
start = time.perf_counter()
pack = create_pack(sys.argv[1], sys.argv[2], sys.argv[3], task="bench", force=True)
wall = time.perf_counter() - start
print(json.dumps({"wall_s": wall, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "parameters": pack.manifest["totals"]["parameters"], "ratio": pack.manifest["totals"]["ratio"]}))
"""

IMPORTS_ONLY = CHILD_PRELUDE + """
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

WHOLE_DELTA = CHILD_PRELUDE + """
from safetensors.torch import load_file
base = load_file(sys.argv[1] + "/model.safetensors")
tuned = load_file(sys.argv[2] + "/model.safetensors")
delta = {name: tuned[name].float() - base[name].float() for name in base}
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

BUILD = """
import sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from skillhub.demo.synthetic import build_tiny_model
layers, hidden, root = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
base = build_tiny_model(root / "base", seed=0, layers=layers, hidden=hidden, intermediate=3 * hidden)
tuned = root / "tuned"
build_tiny_model(tuned, seed=0, layers=layers, hidden=hidden, intermediate=3 * hidden)
# A synthetic fine-tune: low-rank signal plus small dense noise on every matrix.
gen = torch.Generator().manual_seed(1)
tensors = load_file(tuned / "model.safetensors")
for name, t in tensors.items():
    if t.dim() == 2:
        m, n = t.shape
        signal = torch.randn(m, 8, generator=gen) @ torch.randn(8, n, generator=gen) * 1e-3
        tensors[name] = t + signal + 1e-4 * torch.randn(m, n, generator=gen)
save_file(tensors, tuned / "model.safetensors", metadata={"format": "pt"})
"""


def _child(code: str, *args: str) -> dict:
    completed = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--json", type=Path, help="Also write the rows as JSON here.")
    args = parser.parse_args()

    floor = _child(IMPORTS_ONLY)["peak_rss_mib"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            root = Path(tmp) / f"l{layers}"
            subprocess.run([sys.executable, "-c", BUILD, str(layers), str(args.hidden), str(root)], check=True)
            base, tuned = str(root / "base"), str(root / "tuned")
            created = _child(CREATE, base, tuned, str(root / "pack"))
            loaded = _child(WHOLE_DELTA, base, tuned)
            model_mib = (root / "base" / "model.safetensors").stat().st_size / 2**20
            rows.append({
                "layers": layers,
                "parameters": created["parameters"],
                "model_mib": model_mib,
                "create_wall_s": created["wall_s"],
                "params_per_s": created["parameters"] / created["wall_s"],
                "create_peak_rss_mib": created["peak_rss_mib"],
                "create_above_imports_mib": created["peak_rss_mib"] - floor,
                "whole_delta_above_imports_mib": loaded["peak_rss_mib"] - floor,
                "ratio": created["ratio"],
            })

    print(f"imports-only floor: {floor:.0f} MiB peak RSS (torch + transformers + skillhub)\n")
    print("| layers | params | fp32 model | create wall | params/s | create peak RSS | create above floor "
          "| whole-delta above floor | pack ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layers']} | {r['parameters'] / 1e6:.1f} M | {r['model_mib']:.0f} MiB | {r['create_wall_s']:.1f} s "
              f"| {r['params_per_s'] / 1e6:.2f} M/s | {r['create_peak_rss_mib']:.0f} MiB "
              f"| {r['create_above_imports_mib']:.0f} MiB | {r['whole_delta_above_imports_mib']:.0f} MiB "
              f"| {r['ratio']:.2%} |")
    first, last = rows[0], rows[-1]
    print(f"\nlayers x{last['layers'] / first['layers']:.0f}: create peak RSS x"
          f"{last['create_peak_rss_mib'] / first['create_peak_rss_mib']:.2f}, "
          f"whole-delta above floor x{last['whole_delta_above_imports_mib'] / first['whole_delta_above_imports_mib']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"floor_mib": floor, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
