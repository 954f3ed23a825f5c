"""Registry performance: listing a large lineage, and the overhead of activation.

1. A registry holding 10,000 packs (rows inserted directly, each with a real pack's
   manifest) and their 10,001 lineage events: wall time of `skillhub list --json` and
   `skillhub log --json` as whole commands (target < 0.5 s each), and of the Python calls.
2. Activating k packs on a loaded model (`Registry.activated`, in place) against the plain
   torch work it needs, measured side by side in one process: for every touched weight,
   decode each pack's delta, add it to the original in float32 and copy the result in.
   Target: within 1.3x.

    python bench/bench_registry.py [--packs 10000] [--k 1 3 5]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from sqlalchemy import insert

from skillhub import create_pack
from skillhub.registry.front import Registry
from skillhub.demo.synthetic import build_tiny_model
from skillhub.registry.tables import BaseModelRow, EventRow, PackRow, TaskRow


def _timed(function, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fill_registry(directory: Path, manifest: dict, count: int) -> Registry:
    registry = Registry(directory)
    text = json.dumps(manifest)
    now = "2026-11-22T00:00:00.000000Z"
    with registry.engine.begin() as connection:
        connection.execute(insert(BaseModelRow.__table__).values(
            id=1, name="base", location="base", fingerprint=manifest["base"]["fingerprint"], registered_at=now))
        connection.execute(insert(TaskRow.__table__), [
            {"base_id": 1, "name": f"task{i}", "explicit": False} for i in range(count)])
        connection.execute(insert(PackRow.__table__), [
            {"id": f"{i:012x}", "base_id": 1, "name": f"pack{i}", "task": f"task{i}", "version": "1.0.0",
             "sha256": f"{i:064x}", "bytes": 1000, "ratio": 0.07, "parent_id": None, "state": "active",
             "purged": False, "position": i + 1, "added_at": now, "manifest": text} for i in range(count)])
        connection.execute(insert(EventRow.__table__), [
            {"base_id": 1, "kind": "add", "pack_id": f"{i:012x}", "task": f"task{i}", "detail": "{}",
             "actor": "bench", "at": now} for i in range(count)])
    # One 200 MB insert leaves a WAL that every reader would have to consult; registries built
    # pack by pack checkpoint as they go (every 1,000 pages), so start from that state.
    registry.engine.dispose()
    with sqlite3.connect(directory / "registry.db") as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return registry


def command_seconds(registry_dir: Path, *args: str) -> float:
    def run() -> None:
        subprocess.run([sys.executable, "-m", "skillhub", "--registry", str(registry_dir), *args],
                       check=True, capture_output=True)
    return _timed(run, repeats=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packs", type=int, default=10_000)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 3, 5])
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_tiny_model(root / "base", seed=0, layers=4, hidden=512, intermediate=1536)
        packs = []
        for i in range(max(args.k)):
            tuned = build_tiny_model(root / f"tuned{i}", seed=0, layers=4, hidden=512, intermediate=1536)
            from safetensors.torch import load_file, save_file

            tensors = load_file(tuned / "model.safetensors")
            gen = torch.Generator().manual_seed(i + 1)
            for name, tensor in tensors.items():
                tensors[name] = tensor + 1e-3 * torch.randn(tensor.shape, generator=gen)
            save_file(tensors, tuned / "model.safetensors", metadata={"format": "pt"})
            packs.append(create_pack(base, tuned, root / f"pack{i}", task=f"t{i}"))

        big = fill_registry(root / "big", packs[0].manifest, args.packs)
        print(f"registry with {args.packs:,} packs and {args.packs + 1:,} events (manifest of "
              f"{len(json.dumps(packs[0].manifest)):,} bytes each)\n")
        print("| operation | median wall |")
        print("|---|---:|")
        print(f"| `skillhub list --json` (whole command) | {command_seconds(root / 'big', 'list', '--json'):.3f} s |")
        print(f"| `skillhub log --json` (whole command) | {command_seconds(root / 'big', 'log', '--json'):.3f} s |")
        print(f"| `Registry.list_packs()` | {_timed(big.list_packs):.3f} s |")
        print(f"| `Registry.log()` | {_timed(big.log):.3f} s |")

        registry = Registry(root / "small")
        ids = [registry.add(p, task=p.task, base_location=str(base)).id for p in packs]
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        parameters = dict(model.named_parameters())
        print("\n| packs k | plain torch (decode + add) | `Registry.activated` | ratio | with base verification |")
        print("|---:|---:|---:|---:|---:|")
        for k in args.k:
            chosen = ids[:k]
            _, opened = registry.activation_set(packs=chosen)

            def plain() -> None:
                with torch.no_grad():
                    originals = {}
                    for name in sorted({n for p in opened for n in p.modules}):
                        originals[name] = parameters[name].detach().clone()
                        weight = originals[name].float()
                        for pack in opened:
                            if name in pack.modules:
                                weight = weight + pack.decode(name)
                        parameters[name].copy_(weight)
                    for name, original in originals.items():
                        parameters[name].copy_(original)

            def activated(verify: bool) -> None:
                with registry.activated(model, packs=chosen, verify=verify):
                    pass

            rounds = {"plain": [], "registry": [], "verified": []}
            for _ in range(5):  # alternate, so drift in machine load hits both alike
                for label, run in (("plain", plain), ("registry", lambda: activated(False)),
                                   ("verified", lambda: activated(True))):
                    start = time.perf_counter()
                    run()
                    rounds[label].append(time.perf_counter() - start)
            plain_s, registry_s, verified_s = (statistics.median(rounds[k_]) for k_ in ("plain", "registry", "verified"))
            print(f"| {k} | {plain_s:.3f} s | {registry_s:.3f} s | {registry_s / plain_s:.2f} | {verified_s:.3f} s |")


if __name__ == "__main__":
    main()
