"""A whole model of Llama-3-8B's shapes through ``create`` on this machine (issue 28).

The bench writes a 32-layer checkpoint of Llama-3-8B's shapes (hidden 4096, MLP 14336, 8 KV heads,
vocabulary 128256, untied head) in bfloat16, base and tuned, about 16 GB each, and deletes it after.
Every matrix's delta is synthetic: a slowly decaying spectrum (sigma_i ~ i^-0.5 over 1024
directions) plus full-rank noise at a tenth of its energy, as in bench/bench_scale.py, scaled to 1%
of the weights' RMS (a full fine-tune's size, which bfloat16 keeps); the norms get a small dense
delta. Checkpoints of the first 1 and 4 layers share the same shard files (hard
links), so every layer count sees the same tensors.

After the runs, on its own (nothing else running), it times the SVD floor of the same matrices,
read back from the checkpoint: the exact truncated SVD through the float32 Gram eigendecomposition
of the smaller side, at the paper recipe's ranks, on the first ``--floor-layers`` layers (default
4) and scaled to the whole model (every layer has the same shapes and statistics).

Then, each in a fresh process, on the 1-, 4- and 32-layer checkpoints: ``create`` with round-to-
nearest and with calibration (16 windows x 256 tokens of text through SmolLM2's tokenizer, GPTQ);
on 32 layers ``--dry-run``'s predictions against what was measured, and on 4 layers ``--workers 2``
against the serial run (bytes compared). Resident memory is sampled every 20 ms in the child and
attributed to the stage ``create`` reports (reading and planning, the decoder layers with their
calibration, the embedding and head, writing). Each run's ``--dry-run`` plan is made just before
it, and a profile compares them by quarter of the layers: measured and predicted seconds, the
process's CPU use and its share in the kernel, the machine's steal, and the bytes read from
storage with the seconds waited for them (``sysctl kernel.task_delayacct=1`` as root makes the
kernel count those; else 0).

    python bench/bench_scale_model.py [--layers 1 4 32] [--root DIR] [--keep DIR] [--no-workers]
                                      [--floor-layers 4] [--no-gptq 32]

About 80 minutes on 2 cores without the 32-layer GPTQ run (--no-gptq 32 leaves it out; it adds
about 80 minutes), and 35 GB of free disk under --root (default: the system's temporary directory).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_scale import _delta, _paper_params, _same_bytes  # bench/ is this script's directory: on sys.path

from skillhub.io.tensorfile import TensorFile, TensorFileWriter
from skillhub.numerics.svd import gram_svd
from skillhub.operators.builtin.svd import resolve_rank_groups

WIDTH, MLP, KV, VOCAB = 4096, 14336, 1024, 128256  # Llama-3-8B's (--width etc. shrink them for a quick look)
WEIGHT_RMS = 0.02
# A full fine-tune moves a weight by about 1% of its size. bench_scale's deltas are scaled for float32
# (RMS about 1e-8 here): stored in bfloat16 next to weights of 0.02 they would round away, leaving a
# delta that is 99.8% zeros.
DELTA_RMS = 0.01 * WEIGHT_RMS


def _shapes() -> dict[str, tuple[int, int]]:
    return {"self_attn.q_proj": (WIDTH, WIDTH), "self_attn.k_proj": (KV, WIDTH), "self_attn.v_proj": (KV, WIDTH),
            "self_attn.o_proj": (WIDTH, WIDTH), "mlp.gate_proj": (MLP, WIDTH), "mlp.up_proj": (MLP, WIDTH),
            "mlp.down_proj": (WIDTH, MLP)}
CALIB = {"calib_samples": 16, "calib_seqlen": 256}


def _weight(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * WEIGHT_RMS).to(torch.bfloat16)


def _floor_seconds(delta: torch.Tensor, role: str) -> float:
    """The SVD floor of one matrix: float32 Gram eigendecomposition at the paper recipe's rank."""
    params = _paper_params(role)
    rank = sum(size for size, _ in resolve_rank_groups(params["groups"], min(delta.shape), params["reference_dim"]))
    start = time.perf_counter()
    gram_svd(delta, rank, precision=torch.float32)
    return time.perf_counter() - start


def write_model(root: Path, layers: int) -> None:
    """Shards of base/ and tuned/ under ``root/shards``, one per layer plus one for the rest."""
    for side in ("base", "tuned"):
        (root / "shards" / side).mkdir(parents=True, exist_ok=True)
    outside = {"model.embed_tokens.weight": (VOCAB, WIDTH), "lm_head.weight": (VOCAB, WIDTH),
               "model.norm.weight": (WIDTH,)}
    shards: list[tuple[str, dict[str, tuple[int, ...]]]] = [("rest", outside)]
    for index in range(layers):
        names = {f"model.layers.{index}.{name}.weight": shape for name, shape in _shapes().items()}
        names.update({f"model.layers.{index}.{norm}.weight": (WIDTH,)
                      for norm in ("input_layernorm", "post_attention_layernorm")})
        shards.append((f"layer{index:02d}", names))
    seed = 0
    for shard, names in shards:
        writers = {side: TensorFileWriter(root / "shards" / side / f"{shard}.safetensors")
                   for side in ("base", "tuned")}
        for name, shape in names.items():
            seed += 1
            base = _weight(shape, seed) if len(shape) == 2 else torch.ones(shape, dtype=torch.bfloat16)
            generator = torch.Generator().manual_seed(seed)
            if len(shape) == 2:  # at a full fine-tune's size: its RMS 1% of the weights' (bfloat16 keeps it)
                delta = _delta(*shape, seed)
                delta.mul_(DELTA_RMS / delta.square().mean().sqrt())
            else:
                delta = 0.01 * torch.randn(shape, generator=generator)
            writers["base"].add(name, base)
            writers["tuned"].add(name, (base.float() + delta).to(torch.bfloat16))
            del base, delta
        for writer in writers.values():
            writer.finish({"format": "pt"})
        print(f"  wrote {shard}", flush=True)


def svd_floor(root: Path, layers: int) -> float:
    """The SVD floor of every layer's matrices, each delta read back from the shards (untimed)."""
    floor = 0.0
    for index in range(layers):
        base, tuned = (TensorFile(root / "shards" / side / f"layer{index:02d}.safetensors")
                       for side in ("base", "tuned"))
        for name in _shapes():
            key = f"model.layers.{index}.{name}.weight"
            delta = tuned.read(key).float().sub_(base.read(key).float())
            floor += _floor_seconds(delta, "attention" if "self_attn" in name else "mlp")
    return floor


def checkpoint(root: Path, layers: int) -> Path:
    """``root/layersN/{base,tuned}``: the first ``layers`` layers' shards, hard-linked, with their
    config, index and tokenizer (SmolLM2's), and a calibration text."""
    from transformers import AutoTokenizer, LlamaConfig

    from skillhub.demo.real_models import real_model

    directory = root / f"layers{layers}"
    config = LlamaConfig(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=layers,
                         num_attention_heads=WIDTH // 128, num_key_value_heads=KV // 128, vocab_size=VOCAB,
                         tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=8192,
                         torch_dtype="bfloat16")
    tokenizer = AutoTokenizer.from_pretrained(real_model("smollm2"))
    shards = ["rest", *(f"layer{index:02d}" for index in range(layers))]
    for side in ("base", "tuned"):
        target = directory / side
        target.mkdir(parents=True, exist_ok=True)
        weight_map = {}
        for shard in shards:
            source = root / "shards" / side / f"{shard}.safetensors"
            link = target / source.name
            if not link.exists():
                link.hardlink_to(source)
            weight_map.update({name: source.name for name in _header(source) if name != "__metadata__"})
        (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        config.save_pretrained(target)
        tokenizer.save_pretrained(target)
    generator = random.Random(0)
    words = ["the", "model", "keeps", "every", "skill", "as", "a", "small", "removable", "pack", "of", "weights",
             "that", "it", "learned", "from", "one", "task", "after", "another", "and", "can", "remove", "again"]
    (directory / "calib.txt").write_text("\n".join(" ".join(generator.choice(words) for _ in range(60))
                                                   for _ in range(400)))
    return directory


def _header(path: Path) -> dict:
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(size))


# The child: create_pack with a resident-memory sampler; each sample is attributed to the stage
# create reports (start: reading headers, planning, the first module; then layers / embedding and
# head / write).
_CHILD = r"""
import json, os, sys, threading, time, torch
from collections import Counter
from skillhub import create_pack
from skillhub.compress.calibrate import layer_index
from skillhub.compress.estimate import estimate_pack
TICK = os.sysconf("SC_CLK_TCK")
def counters():
    # This process's wall and CPU seconds, the machine's steal (CPU time the hypervisor gave other
    # guests, all cores), this process's seconds waiting on block I/O (0 unless the kernel's
    # task_delayacct is on), its bytes read from storage (page-cache hits are not counted) and its
    # CPU seconds in the kernel (page faults, reclaiming the page cache to make room, reads).
    with open("/proc/stat") as stat:
        steal = int(stat.readline().split()[8]) / TICK
    with open("/proc/self/stat") as stat:
        blkio = int(stat.read().rpartition(")")[2].split()[39]) / TICK
    with open("/proc/self/io") as io:
        read = next(int(line.split()[1]) for line in io if line.startswith("read_bytes:"))
    return (time.perf_counter(), time.process_time(), steal, blkio, read, os.times().system)
if __name__ == "__main__":
    torch.set_num_threads(2)
    directory, output, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    if options.pop("dry_run", False):
        plan = estimate_pack(directory + "/base", directory + "/tuned", **options)
        by_layer = {}
        for module in plan["modules"]:
            index = layer_index(module["name"])
            by_layer[index] = by_layer.get(index, 0.0) + module["seconds"]
        layers = sorted(index for index in by_layer if index is not None)
        print(json.dumps({**plan["totals"], "layer_seconds": [by_layer[index] for index in layers],
                          "outside_seconds": by_layer.get(None, 0.0)}))
        sys.exit()
    marks = []  # counters() after each module create reports
    page = 4096
    stage = {"name": "start"}
    peaks = {}
    done = threading.Event()
    def sample():
        with open("/proc/self/statm") as statm:
            while not done.is_set():
                statm.seek(0)
                rss = int(statm.read().split()[1]) * page
                peaks[stage["name"]] = max(peaks.get(stage["name"], 0), rss)
                time.sleep(0.02)
    def progress(name, count, total):
        if name == "calibrate":
            stage["name"] = "layers"
        elif name == "compress":
            stage["name"] = "layers" if count < total - 3 else ("embedding+head" if count < total else "write")
            marks.append(counters())
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    initial = counters()  # its first field is the start of the run
    create_pack(directory + "/base", directory + "/tuned", output, name="scale", task="scale", force=True,
                progress=progress, **options)
    seconds = time.perf_counter() - initial[0]
    done.set(); sampler.join()
    peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    stages = {k: v / 2**30 for k, v in peaks.items()}
    # Per decoder layer (create finishes one layer's modules before the next's), then the rest.
    with open(directory + "/base/model.safetensors.index.json") as index:
        names = json.load(index)["weight_map"]
    counts = Counter(layer_index(name) for name in names)
    ends, modules = [], 0
    for key in [*sorted(key for key in counts if key is not None), None]:
        modules += counts[key]
        ends.append(marks[modules - 1])
    spans = [[b - a for a, b in zip(before, after)] for before, after in zip([initial] + ends, ends)]
    print(json.dumps({"seconds": seconds, "peak_gb": peak_kb / 2**20, "stages": stages,
                      "layer_spans": spans[:-1], "outside_span": spans[-1]}))
"""


DEVICE: str | None = None  # --device, for every run


def run(directory: Path, output: Path, **options: object) -> dict:
    """One ``create`` (or ``--dry-run``) in a fresh process."""
    if DEVICE is not None:
        options["device"] = DEVICE
    child = subprocess.run([sys.executable, "-c", _CHILD, str(directory), str(output), json.dumps(options)],
                           capture_output=True, text=True)
    if child.returncode != 0:
        raise SystemExit(child.stderr[-3000:])
    return json.loads(child.stdout.strip().splitlines()[-1])


def planned_run(directory: Path, output: Path, **options: object) -> dict:
    """``run``, with the ``--dry-run`` plan of the same call made just before it: this machine's
    speed drifts by 20-40% within an hour, and a plan sees the speed at its own start."""
    plan = run(directory, output.with_name("unused"), dry_run=True, **options)
    return {**run(directory, output, **options), "plan": plan}


def _quantizers(directory: Path, layers: int, no_gptq: list[int]) -> list[tuple[str, dict]]:
    """(label, create options) of the runs on ``directory``: RTN, and GPTQ unless left out."""
    calibrated = {"calib": str(directory / "calib.txt"), **CALIB}
    return [("RTN", {})] + ([] if layers in no_gptq else [("GPTQ", calibrated)])


def _stages(result: dict) -> str:
    stages = result["stages"]
    return " | ".join(f"{stages.get(name, 0):.2f}" for name in ("start", "layers", "embedding+head", "write"))


def _profile(key: str, result: dict) -> list[str]:
    """Rows of where a run's time went against its plan: the decoder layers by quarter (the first
    quarter includes create's start), then the embedding, head and final norm; with the process's
    CPU time per wall second (2 threads: up to 2) and its share in the kernel, the machine's steal
    (CPU time the hypervisor gave other guests) per core-second, the bytes read from storage (not
    the page cache) and the seconds spent waiting for them (with the kernel's task_delayacct on;
    else 0)."""
    plan, spans = result["plan"], result["layer_spans"]
    calibration = (plan.get("calibration_seconds") or 0.0) / len(spans)  # every layer has the same shapes
    predicted = [seconds + calibration for seconds in plan["layer_seconds"]]
    quarter = max(1, len(spans) // 4)
    parts = [(f"layers {first + 1}-{min(first + quarter, len(spans))}", spans[first:first + quarter],
              predicted[first:first + quarter]) for first in range(0, len(spans), quarter)]
    parts.append(("embedding, head, norm", [result["outside_span"]], [plan["outside_seconds"]]))
    rows = []
    for where, measured, planned in parts:
        wall, cpu, steal, blkio, read, system = (sum(span[i] for span in measured) for i in range(6))
        rows.append(f"| {key} | {where} | {wall:.1f} | {sum(planned):.1f} | {sum(planned) / wall:.2f} | "
                    f"{cpu / wall:.2f} | {system / cpu:.1%} | {steal / (wall * (os.cpu_count() or 1)):.1%} | "
                    f"{read / 1e9:.1f} | {blkio:.1f} |")
    return rows


def main() -> None:
    global WIDTH, MLP, KV, VOCAB, DEVICE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 4, 32])
    parser.add_argument("--root", type=Path, default=None, help="where the checkpoints are written (deleted after)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write into this directory and keep it (and measured.json): a later call with the "
                             "same --keep reuses the checkpoints and the runs already measured")
    parser.add_argument("--no-workers", action="store_true", help="skip the --workers 2 run")
    parser.add_argument("--floor-layers", type=int, default=4,
                        help="layers the SVD floor is timed on (then scaled to the whole model)")
    parser.add_argument("--no-gptq", type=int, nargs="*", default=[], metavar="LAYERS",
                        help="layer counts to run without the calibrated (GPTQ) create")
    parser.add_argument("--device", default=None, help="create's --device (cuda: see bench/gpu_check.sh)")
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--mlp", type=int, default=MLP)
    parser.add_argument("--kv", type=int, default=KV)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    args = parser.parse_args()
    WIDTH, MLP, KV, VOCAB, DEVICE = args.width, args.mlp, args.kv, args.vocab, args.device
    torch.set_num_threads(2)
    root = args.keep or Path(tempfile.mkdtemp(prefix="skillhub-scale-", dir=args.root))
    try:
        measure(root, args)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


def measure(root: Path, args: argparse.Namespace) -> None:
    record = root / "measured.json"
    measured = json.loads(record.read_text()) if record.exists() else {}

    def once(key: str, make):  # each measurement is made once per --keep directory
        if key not in measured:
            measured[key] = make()
            record.write_text(json.dumps(measured, indent=1))
        return measured[key]

    most = max(args.layers)
    root.mkdir(parents=True, exist_ok=True)

    if not (root / "shards" / "tuned" / f"layer{most - 1:02d}.safetensors").exists():
        print(f"writing {most} layers of Llama-3-8B's shapes, base and tuned, under {root}", flush=True)
        start = time.perf_counter()
        write_model(root, most)
        print(f"written in {time.perf_counter() - start:.0f} s\n", flush=True)
    print("| layers | quantizer | create s | s per layer | peak GiB | start | layers | embedding+head | write |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for layers in sorted(args.layers):
        directory = checkpoint(root, layers)
        for label, options in _quantizers(directory, layers, args.no_gptq):
            result = once(f"{layers}/{label}", lambda: planned_run(directory, root / "pack", **options))
            shutil.rmtree(root / "pack", ignore_errors=True)
            print(f"| {layers} | {label} | {result['seconds']:.1f} | {result['seconds'] / layers:.1f} | "
                  f"{result['peak_gb']:.2f} | {_stages(result)} |", flush=True)
    timed = min(args.floor_layers, most)
    floor = once("svd_floor", lambda: svd_floor(root, timed)) * most / timed
    print(f"\nSVD floor of the {most} layers' matrices, timed alone on {timed} of them: {floor:.1f} s")
    calibrated = max(n for n in args.layers if n not in args.no_gptq)
    rtn, gptq = measured[f"{most}/RTN"], measured[f"{calibrated}/GPTQ"]
    runs = [key for key in measured if key.count("/") == 1 and key.split("/")[0].isdigit()]
    print(f"{most} layers: RTN {rtn['seconds']:.0f} s = {rtn['seconds'] / floor:.2f} x the SVD floor "
          f"({floor:.0f} s; goal <= 1.5); on {calibrated} layers GPTQ "
          f"{gptq['seconds'] / measured[f'{calibrated}/RTN']['seconds']:.2f} x RTN (goal <= 2); "
          f"peak {max(measured[key]['peak_gb'] for key in runs):.2f} GiB (goal <= 3 GB = 2.79 GiB)")
    for label in ("RTN", "GPTQ"):
        peaks = {key: measured[key]["peak_gb"] for key in runs if key.endswith(label)}
        low, high = min(peaks.values()), max(peaks.values())
        print(f"{label}: peak from {low:.2f} to {high:.2f} GiB over "
              f"{sorted(int(key.split('/')[0]) for key in peaks)} layers ({high / low - 1:+.1%}; goal: within 10%)")
    directory = root / f"layers{most}"
    print("\n| --dry-run | predicted s | measured s | ratio | predicted peak GiB | measured peak GiB | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, options in _quantizers(directory, most, []):
        real = measured.get(f"{most}/{label}")
        # The plan made just before the run; for runs recorded without one, a plan made now.
        plan = (real or {}).get("plan") or run(directory, root / "unused", dry_run=True, **options)
        predicted_peak = plan["peak_bytes"] / 2**30
        if real is None:
            print(f"| {label} | {plan['seconds']:.0f} | not run | | {predicted_peak:.2f} | not run | |", flush=True)
            continue
        print(f"| {label} | {plan['seconds']:.0f} | {real['seconds']:.0f} | {plan['seconds'] / real['seconds']:.2f} | "
              f"{predicted_peak:.2f} | {real['peak_gb']:.2f} | {predicted_peak / real['peak_gb']:.2f} |", flush=True)
    profiled = [key for key in runs if "layer_spans" in measured[key]]
    if profiled:
        print("\n| run | where | measured s | predicted s | ratio | CPU s per s | of it kernel | steal | read GB "
              "| I/O wait s |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for key in sorted(profiled, key=lambda key: (int(key.split("/")[0]), key)):
            print("\n".join(_profile(key, measured[key])), flush=True)
    if not args.no_workers:
        few = sorted(args.layers)[len(args.layers) // 2]  # 4 of 1, 4, 32: the whole model's pattern in a few minutes
        directory = checkpoint(root, few)

        def parallel() -> dict:
            serial = run(directory, root / "serial-few")
            result = run(directory, root / "parallel", workers=2)
            result["serial_seconds"] = serial["seconds"]
            result["identical"] = _same_bytes(root / "serial-few", root / "parallel")
            shutil.rmtree(root / "parallel")
            shutil.rmtree(root / "serial-few")
            return result
        result = once(f"{few}/RTN/workers2", parallel)
        print(f"\n{few} layers, RTN, --workers 2: {result['seconds']:.0f} s against {result['serial_seconds']:.0f} s "
              f"serial, side by side (speed-up {result['serial_seconds'] / result['seconds']:.2f}), peak of the "
              f"parent {result['peak_gb']:.2f} GiB, byte-identical: {result['identical']}", flush=True)


if __name__ == "__main__":
    main()
