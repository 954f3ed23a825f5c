"""Serving N skills: one plain transformers model per task against ``skillhub serve``, side by side.

The three SmolLM2-135M-Instruct fine-tunes of bench_real (the demo's zentro, extract and convert,
every parameter fine-tuned; built once and kept in --workdir) are served three ways, each in its
own server process on 127.0.0.1, and driven by the real ``openai`` client with the same requests
(the tasks' unseen eval prompts, round-robin over the tasks; chat, greedy, at most --max-tokens):

- (a) ``baseline``: the N fine-tunes, each a ``transformers`` model in memory, behind a FastAPI
  server that batches like skillhub does (the requests of one model together, the oldest first,
  at most --max-batch; one thread generates): the best one can do holding N models;
- (b) ``named``: ``skillhub serve`` on a registry holding the base and the three packs (paper
  recipe), each request naming its task;
- (c) ``auto``: the same server, every request ``auto`` (the router picks the packs).

skillhub runs twice: keeping every pack set patched (``--cache-sets 4``: the three tasks' and the
base's, memory base + 3 sets) and keeping one (``--cache-sets 1``: base + 1 set whatever N, each
switch decodes the set's packs again).

At concurrency 1, 4 and 16 it reports generated tokens per second and p50/p95 latency, and each
server's peak resident memory, sampled through the run. Goals (issue 25): at concurrency 16,
(c) >= 0.9 x (b) and (b) >= 0.8 x (a), with one base instead of N models in memory.

It also measures the peak resident memory of holding 1, 2 and 3 tasks each way, each in a fresh
process: the fine-tunes loaded side by side, or the base with one set patched in at a time.

    python bench/bench_serve.py [--workdir DIR] [--requests 48] [--max-tokens 32] [--json FILE] [--memory-only]

About 20 minutes on 2 cores once the fine-tunes and packs exist (bench_real builds the same fine-tunes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request  # at the top: FastAPI reads the endpoint's annotations from module globals

HERE = Path(__file__).resolve().parent
TASKS = ("zentro", "extract", "convert")
CONCURRENCY = (1, 4, 16)


# ---------------------------------------------------------------------- (a) the N-models server


def baseline_app(models: dict[str, Path], max_batch: int):
    """A FastAPI app holding one transformers model per task, batching per model (oldest first)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from skillhub.scoring.generation import generate_answers
    from skillhub.scoring.prompts import Renderer

    loaded = {}
    for task, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
        loaded[task] = (model, Renderer(AutoTokenizer.from_pretrained(path)))
    queue: list[dict[str, Any]] = []
    wake = threading.Condition()

    def work() -> None:
        while True:
            with wake:
                while not queue:
                    wake.wait()
                oldest = queue[0]["model"]
                batch = [j for j in queue if j["model"] == oldest][:max_batch]
                for job in batch:
                    queue.remove(job)
            model, renderer = loaded[oldest]
            with torch.no_grad():
                answers = generate_answers(model, renderer, [j["ids"] for j in batch],
                                           max_new_tokens=max(j["max_tokens"] for j in batch))
            for job, ids in zip(batch, answers):
                ids = ids[:job["max_tokens"]]
                job["loop"].call_soon_threadsafe(job["done"].set_result, (renderer.decode(ids), len(ids)))

    threading.Thread(target=work, daemon=True).start()
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        import asyncio

        body = await request.json()
        model, renderer = loaded[body["model"]]
        job = {"model": body["model"], "ids": renderer.prompt_ids(body["messages"][-1]["content"]),
               "max_tokens": body["max_tokens"], "loop": asyncio.get_running_loop()}
        job["done"] = job["loop"].create_future()
        with wake:
            queue.append(job)
            wake.notify()
        text, tokens = await job["done"]
        return {"id": "b", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": len(job["ids"]), "completion_tokens": tokens,
                          "total_tokens": len(job["ids"]) + tokens}}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


# ---------------------------------------------------------------------- setup


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def build(workdir: Path) -> tuple[Path, dict[str, Path], Path, dict[str, list[str]]]:
    """(base, fine-tune per task, registry with the packs and a router, unseen prompts per task)."""
    sys.path.insert(0, str(HERE))
    from bench_real import FINETUNES, build as build_finetune

    from skillhub.compress.pipeline import create_pack
    from skillhub.demo.synthetic import write_jsonl
    from skillhub.registry.front import Registry
    from skillhub.routing.training import train_router

    tuned, prompts, packs = {}, {}, {}
    for spec in FINETUNES:
        if spec.model != "smollm2":
            continue
        base, tuned[spec.task], _, test = build_finetune(spec, workdir / "real")
        train, _ = spec.data()
        prompts[spec.task] = [e["prompt"] for e in test]
        packs[spec.task] = workdir / "serve" / "packs" / spec.task
        if not (packs[spec.task] / "skillpack.json").is_file():
            create_pack(base, tuned[spec.task], packs[spec.task], task=spec.task, force=True)
        write_jsonl(train, workdir / "serve" / f"{spec.task}-route.jsonl")
    registry_dir = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "registry"
    registry = Registry(registry_dir)
    for task in TASKS:
        registry.add(packs[task], task=task, base_location=str(base))
        registry.add_routing_examples(task, workdir / "serve" / f"{task}-route.jsonl")
    train_router(registry)
    return base, tuned, registry_dir, prompts


class Server:
    """A server in its own process, its resident memory sampled while it runs."""

    def __init__(self, command: list[str], port: int) -> None:
        import psutil

        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.handle = psutil.Process(self.process.pid)
        self.peak = 0
        deadline = time.monotonic() + 600
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command} did not start: {self.process.stderr.read()[-2000:]}")
            time.sleep(0.5)
        self._sampling = True
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return json.loads(response.read()).get("status") == "ok"
        except OSError:
            return False

    def _sample(self) -> None:
        while self._sampling:
            self.peak = max(self.peak, self.handle.memory_info().rss)
            time.sleep(0.1)

    def stop(self) -> None:
        self._sampling = False
        self.process.terminate()
        self.process.wait(60)


def drive(url: str, work: list[tuple[str, str]], concurrency: int, max_tokens: int) -> dict[str, float]:
    """Send every (model, prompt) with ``concurrency`` clients; tokens/s and latency percentiles."""
    import openai

    api = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)

    def one(item: tuple[str, str]) -> tuple[float, int]:
        started = time.perf_counter()
        answer = api.chat.completions.create(model=item[0], messages=[{"role": "user", "content": item[1]}],
                                             temperature=0, max_tokens=max_tokens)
        return time.perf_counter() - started, answer.usage.completion_tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, work))
    wall = time.perf_counter() - started
    latencies = sorted(r[0] for r in results)
    return {"tokens_per_s": sum(r[1] for r in results) / wall, "p50_s": statistics.median(latencies),
            "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], "requests": len(results),
            "wall_s": wall}


def memory_probe(setup: str, paths: dict[str, str], registry_dir: str) -> int:
    """Peak resident bytes of holding the tasks ``paths`` names: ``baseline`` loads each fine-tune;
    ``skillhub`` loads the base and switches once through each task's set with one set kept."""
    import psutil

    process = psutil.Process()
    peak = 0
    if setup == "baseline":
        from transformers import AutoModelForCausalLM

        models = []
        for path in paths.values():
            models.append(AutoModelForCausalLM.from_pretrained(path, dtype="auto"))
            for parameter in models[-1].parameters():  # weights loaded lazily (mmap) are resident once used
                parameter.data.sum()
            peak = max(peak, process.memory_info().rss)
        return peak
    from skillhub.registry.front import Registry
    from skillhub.routing.generate import Generator

    generator = Generator(Registry(registry_dir), cache_sets=1)
    for _ in range(2):
        for task in paths:
            generator.patcher.use(generator.opened(generator.registry.activation_ids(task=task)))
            peak = max(peak, process.memory_info().rss)
    return peak


def memory_by_tasks(tuned: dict[str, Path], registry_dir: Path) -> dict[str, list[int]]:
    """Peak resident memory holding 1..N tasks each way, each in a fresh process."""
    result: dict[str, list[int]] = {"baseline": [], "skillhub": []}
    for count in range(1, len(TASKS) + 1):
        paths = {t: str(tuned[t]) for t in TASKS[:count]}
        for setup in result:
            output = subprocess.run([sys.executable, __file__, "--memory-probe", setup, json.dumps(paths),
                                     str(registry_dir)], check=True, capture_output=True, text=True).stdout
            result[setup].append(int(output.split()[-1]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "skillhub-bench")
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level and setup")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--baseline-server", nargs=2, metavar=("PORT", "MODELS_JSON"), help=argparse.SUPPRESS)
    parser.add_argument("--memory-probe", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--memory-only", action="store_true", help="only the resident memory for 1..N tasks")
    args = parser.parse_args()
    if args.memory_probe:
        print(memory_probe(args.memory_probe[0], json.loads(args.memory_probe[1]), args.memory_probe[2]))
        return
    if args.baseline_server:
        import uvicorn

        models = {k: Path(v) for k, v in json.loads(args.baseline_server[1]).items()}
        uvicorn.run(baseline_app(models, args.max_batch), host="127.0.0.1", port=int(args.baseline_server[0]),
                    log_level="warning")
        return

    _, tuned, registry_dir, prompts = build(args.workdir)
    by_tasks = memory_by_tasks(tuned, registry_dir)
    for setup, peaks in by_tasks.items():
        print(f"peak RSS holding 1..{len(TASKS)} tasks, {setup}: " + ", ".join(f"{p / 2**20:.0f}" for p in peaks)
              + " MiB", flush=True)
    if args.memory_only:
        shutil.rmtree(registry_dir.parent, ignore_errors=True)
        return
    work = [(TASKS[i % 3], prompts[TASKS[i % 3]][(i // 3) % len(prompts[TASKS[i % 3]])]) for i in range(args.requests)]
    servers = {"baseline": Server([sys.executable, __file__, "--max-batch", str(args.max_batch), "--baseline-server",
                                   str(port := free_port()), json.dumps({t: str(p) for t, p in tuned.items()})], port)}
    for cache in (len(TASKS) + 1, 1):  # every set kept (the tasks' and the base's), or one
        port = free_port()
        servers[f"cache {cache}"] = Server(
            [sys.executable, "-m", "skillhub", "--registry", str(registry_dir), "serve", "--port", str(port),
             "--max-batch", str(args.max_batch), "--max-tokens", str(args.max_tokens), "--cache-sets", str(cache)],
            port)
    setups = [("baseline", "baseline", False)]
    setups += [(f"{how}, {name}", name, how == "auto") for name in servers if name != "baseline"
               for how in ("named", "auto")]
    rows = []
    try:
        for _, name, routed in setups:  # warm up
            drive(servers[name].url, [("auto" if routed else t, p) for t, p in work[:3]], 1, args.max_tokens)
        for concurrency in CONCURRENCY:
            for setup, name, routed in setups:
                result = drive(servers[name].url, [("auto" if routed else t, p) for t, p in work], concurrency,
                               args.max_tokens)
                rows.append({"setup": setup, "concurrency": concurrency, **result})
                print(f"{setup:16s} c={concurrency:2d}: {result['tokens_per_s']:6.1f} tok/s  "
                      f"p50 {result['p50_s']:6.2f} s  p95 {result['p95_s']:6.2f} s", flush=True)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(registry_dir.parent, ignore_errors=True)  # the bench's own temporary registry
    memory = {name: server.peak for name, server in servers.items()}
    at16 = {r["setup"]: r["tokens_per_s"] for r in rows if r["concurrency"] == 16}
    summary = {}
    for name in servers:
        if name != "baseline":
            summary[name] = {"auto/named": at16[f"auto, {name}"] / at16[f"named, {name}"],
                             "named/baseline": at16[f"named, {name}"] / at16["baseline"],
                             "memory/baseline": memory[name] / memory["baseline"]}
    print("peak RSS: " + ", ".join(f"{name} {peak / 2**20:.0f} MiB" for name, peak in memory.items()))
    for name, ratios in summary.items():
        print(f"{name}, at concurrency 16: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "peak_rss_bytes": memory, "summary": summary,
                                         "peak_rss_bytes_by_tasks": by_tasks,
                                         "settings": {**vars(args), "workdir": str(args.workdir),
                                                      "json": str(args.json)},
                                         "cpu_count": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
