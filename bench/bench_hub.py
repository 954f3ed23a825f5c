"""Push and pull of a pack of at least 50 MB against a local Hub server, side by side with
plain huggingface_hub calls moving the same files in the same run.

- push: ``push_pack`` (repo creation, upload with every file's sha256 checked against the
  manifest, version tag) against ``create_repo(exist_ok=True)`` + ``upload_folder``.
- pull: ``pull_pack`` into a fresh registry (revision resolved to a commit, manifest read
  and schema-checked, base checked, files streamed into the store and hashed as they
  arrive, registered in one transaction) against ``snapshot_download`` into a fresh cache.

The server (tests/hubserver.py, which speaks the Hub protocol) runs in its own process.
Each round times both sides back to back, alternating which goes first, on fresh repos;
the report gives the ratios skillhub / plain of the medians and of the best rounds
(target: <= 1.10). Every
measurement starts after ``os.sync()``, so none pays for writing back another's files.

    python bench/bench_hub.py [--rounds 15] [--layers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from hubserver import free_port  # noqa: E402  (the test suite's Hub server)

SERVE = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from hubserver import FakeHub
FakeHub(Path(sys.argv[1]), port=int(sys.argv[2])).start()
print("ready", flush=True)
time.sleep(10**6)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--layers", type=int, default=2, help="Layers of the model whose delta is packed (2: ~66 MB).")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="skillhub-bench-hub-"))
    port = free_port()
    # huggingface_hub reads these when first imported: set them before anything imports it.
    os.environ.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_DISABLE_XET="1", HF_HOME=str(work / "hf"),
                      HF_HUB_DISABLE_PROGRESS_BARS="1", HF_TOKEN="hf_bench")
    server = subprocess.Popen([sys.executable, "-c", SERVE, str(work / "server"), str(port), str(ROOT / "tests")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        report = run(work, args.rounds, args.layers)
    finally:
        server.kill()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "bench_hub.json").write_text(json.dumps(report, indent=2) + "\n")


def run(work: Path, rounds: int, layers: int) -> dict:
    import torch
    from huggingface_hub import HfApi, snapshot_download

    from skillhub import create_pack
    from skillhub.registry.front import Registry
    from skillhub.sharing import pull_pack, push_pack
    from skillhub.demo.synthetic import build_tiny_model
    from skillhub.io.tensorfile import TensorFile
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    base = build_tiny_model(work / "base", seed=0, layers=layers, hidden=1024, intermediate=4096)
    tuned = work / "tuned"
    shutil.copytree(base, tuned)
    weights = TensorFile(base / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    save_file({n: weights.read(n) + 1e-3 * torch.randn(weights.shape(n), generator=gen) for n in weights.keys()},
              tuned / "model.safetensors", metadata={"format": "pt"})
    raw = {"name": "raw", "rules": [{"match": {"pattern": "."}, "operator": "raw"}]}
    pack = create_pack(base, tuned, work / "pack", task="bench", recipe=raw)
    size = sum(f.stat().st_size for f in pack.path.iterdir())
    assert size >= 50e6, f"the pack has only {size / 1e6:.1f} MB"

    api = HfApi()
    timings: dict[str, list[float]] = {"push": [], "upload_folder": [], "pull": [], "snapshot_download": []}

    def timed(key: str, function) -> None:
        # Start every measurement with nothing waiting to be written back: pull syncs its files to
        # disk, and would otherwise also wait for whatever the previous steps left dirty.
        os.sync()
        start = time.perf_counter()
        function()
        timings[key].append(time.perf_counter() - start)

    for number in range(rounds):
        ours, plain = f"user/skillhub-{number}", f"user/plain-{number}"
        push = lambda: push_pack(pack, ours)  # noqa: E731
        upload = lambda: (api.create_repo(plain, exist_ok=True), api.upload_folder(repo_id=plain, folder_path=pack.path))  # noqa: E731
        registry = Registry(work / f"registry-{number}")  # an existing registry, as a user has
        pull = lambda: pull_pack(ours, registry=registry)  # noqa: E731
        download = lambda: snapshot_download(plain, cache_dir=work / f"cache-{number}")  # noqa: E731
        pairs = [(("push", push), ("upload_folder", upload)), (("pull", pull), ("snapshot_download", download))]
        for first, second in pairs:
            for key, function in (first, second) if number % 2 == 0 else (second, first):
                timed(key, function)
        shutil.rmtree(work / f"registry-{number}", ignore_errors=True)
        shutil.rmtree(work / f"cache-{number}", ignore_errors=True)

    median = {key: statistics.median(values) for key, values in timings.items()}
    best = {key: min(values) for key, values in timings.items()}
    return {
        "pack_bytes": size,
        "rounds": rounds,
        "median_seconds": {k: round(v, 4) for k, v in median.items()},
        "best_seconds": {k: round(v, 4) for k, v in best.items()},
        # skillhub / plain: of the medians, and of the best rounds (the least disturbed by the
        # machine's noise, which here is bimodal on both sides alike).
        "push_ratio": {"median": round(median["push"] / median["upload_folder"], 3),
                       "best": round(best["push"] / best["upload_folder"], 3)},
        "pull_ratio": {"median": round(median["pull"] / median["snapshot_download"], 3),
                       "best": round(best["pull"] / best["snapshot_download"], 3)},
        "all_seconds": {k: [round(x, 4) for x in v] for k, v in timings.items()},
    }


if __name__ == "__main__":
    main()
