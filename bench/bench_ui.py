"""The registry browser on a big registry: each page's time on the 10,000-pack registry of
bench_registry (10,000 tasks, 10,000 lineage events), served by ``skillhub ui``'s app.

Each page is fetched over HTTP from the app on 127.0.0.1 (uvicorn in this process), 5 times; the
median time to the last byte is reported. Goal (issue 26): under 1 s per page.

    python bench/bench_ui.py [--packs 10000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_registry import fill_registry  # noqa: E402

from skillhub import create_pack  # noqa: E402
from skillhub.demo.synthetic import build_tiny_model  # noqa: E402
from skillhub.serving.app import create_browser_app  # noqa: E402

PAGES = ("/", "/lineage", "/packs", "/packs?sort=bytes&order=desc&page_number=50", "/packs/{id}", "/tasks",
         "/router", "/interference", "/api/packs", "/api/log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packs", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        base = build_tiny_model(root / "base", seed=0)
        tuned = build_tiny_model(root / "tuned", seed=1)
        torch.manual_seed(0)
        manifest = create_pack(base, tuned, root / "pack", task="t").manifest
        registry = fill_registry(root / "big", manifest, args.packs)
        port = 8765
        server = uvicorn.Server(uvicorn.Config(create_browser_app(registry), host="127.0.0.1", port=port,
                                               log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        print(f"| page ({args.packs:,} packs) | median seconds | bytes |\n|---|---:|---:|")
        for page in PAGES:
            path = page.format(id=f"{args.packs // 2:012x}")
            times = []
            for _ in range(5):
                started = time.perf_counter()
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}") as response:
                    size = len(response.read())
                times.append(time.perf_counter() - started)
            print(f"| `{path}` | {statistics.median(times):.3f} | {size:,} |", flush=True)
        server.should_exit = True


if __name__ == "__main__":
    main()
