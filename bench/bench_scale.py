"""Compression at real scale (issue 16): one decoder layer of Llama-3-8B's width, side by side.

The seven matrices of one layer (q 4096x4096, k and v 1024x4096, o 4096x4096, gate and up
14336x4096, down 4096x14336) hold a synthetic fine-tune delta: a slowly decaying spectrum
(sigma_i ~ i^-0.5 over 1024 directions) plus full-rank noise at a tenth of its energy. Each
matrix is factored at the paper recipe's rank for its size by:

- the floor: the exact truncated SVD through the eigendecomposition of the Gram matrix of the
  smaller side (``gram_svd``), in float64 and in float32 (faster; skillhub uses it where the
  spectrum allows); the ratio is against the faster;
- skillhub's ``truncated_svd`` (which picks the cheaper of that and a randomized range finder);
- a full ``torch.linalg.svd`` (what skillhub did before, for every rank above a quarter of the side);
- the randomized range finder forced, to see where it pays (this is how the crossover was set).

Reported per matrix: seconds for each, and the error of the svd-mixed pack (paper bit widths,
round-to-nearest) built from skillhub's factors against the one built from the full SVD's.

Then the whole path: ``create`` (paper recipe, no calibration) of a one-layer checkpoint of that
width in bfloat16 whose fine-tune delta is those seven matrices, timed against the floor.

Then, each in a fresh process (peak RSS: the kernel's high-water mark, VmHWM), on
checkpoints of 1, 2 and 4 such layers: ``create`` with calibration (16 windows x 256 tokens, GPTQ)
against ``create`` without (RTN) on the same checkpoint; and ``--workers 2`` and ``--executor ray``
against the serial run, bytes compared.

    python bench/bench_scale.py [--width 4096 --mlp 14336 --kv 1024] [--layers 1 2 4] [--skip-svd]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from skillhub.compress.recipe import PAPER_RECIPE
from skillhub.numerics.svd import gram_svd, randomized_svd, truncated_svd
from skillhub.operators import get_operator, resolve_params
from skillhub.operators.builtin.svd import resolve_rank_groups
from skillhub.progress import quiet_transformers


def _delta(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A slow spectrum over 1024 directions plus full-rank noise at a tenth of its energy (in place
    where it can: bench_scale_model makes vocabulary-sized ones)."""
    generator = torch.Generator().manual_seed(seed)
    k = 1024
    left = torch.randn(rows, k, generator=generator).div_(rows**0.5).mul_(torch.arange(1, k + 1).pow(-0.5))
    signal = left @ torch.randn(k, cols, generator=generator).div_(cols**0.5)
    del left
    noise = torch.randn(rows, cols, generator=generator)
    noise.mul_(0.1**0.5 * signal.norm() / noise.norm())
    return signal.add_(noise).mul_(1e-3)


def _paper_params(role: str) -> dict:
    """The paper recipe's svd-mixed params for ``role``, resolved."""
    return resolve_params(get_operator("svd-mixed"),
                          next(r["params"] for r in PAPER_RECIPE["rules"] if r["match"]["role"] == role), where="bench")


def _timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def _pack_error(matrix: torch.Tensor, factors, groups, params) -> float:
    """Relative error of the svd-mixed (round-to-nearest) encoding of these factors."""
    operator = get_operator("svd-mixed")
    u, s, vh = factors
    approximation = torch.zeros_like(matrix)
    start = 0
    for size, bits in groups:
        block = slice(start, start + size)
        u_q, v_q = operator.quantize_group(u[:, block], s[block], vh[block], bits=bits, params=params, hessian=None)
        approximation += (u_q.dequantize().T * s[block]) @ v_q.dequantize()
        start += size
    return float((matrix - approximation).norm() / matrix.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--mlp", type=int, default=14336)
    parser.add_argument("--kv", type=int, default=1024)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--skip-svd", action="store_true", help="only the create runs")
    args = parser.parse_args()
    torch.set_num_threads(2)
    floor = None if args.skip_svd else svd_table(args)
    with tempfile.TemporaryDirectory() as tmp:
        create_runs(args, Path(tmp), floor)


def svd_table(args: argparse.Namespace) -> float:
    """The SVD table; returns the floor for one layer (seconds)."""
    w, f, kv = args.width, args.mlp, args.kv
    matrices = {"q_proj": ("attention", w, w), "k_proj": ("attention", kv, w), "v_proj": ("attention", kv, w),
                "o_proj": ("attention", w, w), "gate_proj": ("mlp", f, w), "up_proj": ("mlp", f, w),
                "down_proj": ("mlp", w, f)}
    print("| matrix | shape | rank | Gram fp64 s | Gram fp32 s | skillhub s | full SVD s | randomized s | "
          "pack error skillhub | pack error full SVD |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    totals = {"floor": 0.0, "floor32": 0.0, "skillhub": 0.0, "full": 0.0, "randomized": 0.0}
    worst = 0.0
    for seed, (name, (role, rows, cols)) in enumerate(matrices.items()):
        matrix = _delta(rows, cols, seed)
        params = _paper_params(role)
        groups = resolve_rank_groups(params["groups"], min(rows, cols), params["reference_dim"])
        rank = sum(size for size, _ in groups)
        generator = torch.Generator().manual_seed(0)
        _, floor = _timed(lambda: gram_svd(matrix, rank, precision=torch.float64))
        _, floor32 = _timed(lambda: gram_svd(matrix, rank, precision=torch.float32))
        ours, mine = _timed(lambda: truncated_svd(matrix, rank, generator=generator))
        full, full_time = _timed(lambda: [t[..., :rank] if i == 0 else t[:rank]
                                          for i, t in enumerate(torch.linalg.svd(matrix, full_matrices=False))])
        _, randomized = _timed(lambda: randomized_svd(matrix, rank, generator=generator))
        ours_error, full_error = _pack_error(matrix, ours, groups, params), _pack_error(matrix, full, groups, params)
        worst = max(worst, ours_error / full_error - 1)
        for key, seconds in zip(totals, (floor, floor32, mine, full_time, randomized)):
            totals[key] += seconds
        print(f"| {name} | {rows}x{cols} | {rank} | {floor:.2f} | {floor32:.2f} | {mine:.2f} | {full_time:.2f} | "
              f"{randomized:.2f} | {ours_error:.5f} | {full_error:.5f} |", flush=True)
    print(f"| **layer** | | | {totals['floor']:.2f} | {totals['floor32']:.2f} | {totals['skillhub']:.2f} | "
          f"{totals['full']:.2f} | {totals['randomized']:.2f} | | |")
    fastest_floor = min(totals["floor"], totals["floor32"])
    print(f"\nskillhub / floor: {totals['skillhub'] / fastest_floor:.2f}; "
          f"full SVD / floor: {totals['full'] / fastest_floor:.2f}; "
          f"worst pack error vs the full SVD's: {worst:+.3%} (goal within 1%)")
    return fastest_floor


_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _checkpoints(root: Path, width: int, mlp: int, kv: int, layers: int) -> Path:
    """Base and tuned bfloat16 Llama checkpoints of ``layers`` layers at this width (vocabulary 256),
    every layer's seven matrices carrying the bench's delta, and a tokenizer for calibration."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from skillhub.demo.synthetic import build_tokenizer

    shapes = {"q_proj": (width, width), "k_proj": (kv, width), "v_proj": (kv, width), "o_proj": (width, width),
              "gate_proj": (mlp, width), "up_proj": (mlp, width), "down_proj": (width, mlp)}
    config = LlamaConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=width // 128, num_key_value_heads=kv // 128, vocab_size=256,
                         tie_word_embeddings=False, torch_dtype="bfloat16")
    directory = root / f"layers{layers}"
    torch.manual_seed(0)
    with quiet_transformers():
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(directory / "base")
    with torch.no_grad():
        for layer in model.model.layers:
            for seed, name in enumerate(_MATRICES):
                owner = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
                weight = getattr(owner, name).weight
                weight += _delta(*shapes[name], seed).to(weight.dtype)
    with quiet_transformers():
        model.save_pretrained(directory / "tuned")
    for side in ("base", "tuned"):
        build_tokenizer().save_pretrained(directory / side)
    generator = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "sigma", "omega", "kappa", "lambda"]
    (directory / "calib.txt").write_text(" ".join(f"{generator.choice(words)}{generator.randint(0, 99)}"
                                                  for _ in range(20000)))
    return directory


_CHILD = """
import json, sys, time, torch
from skillhub import create_pack
if __name__ == "__main__":
    torch.set_num_threads(2)
    directory, output, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    start = time.perf_counter()
    create_pack(directory + "/base", directory + "/tuned", output, name="scale", task="scale", force=True, **options)
    # VmHWM, not ru_maxrss: the latter survives exec, so it would count the parent this process was forked from.
    peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_gb": peak_kb / 2**20}))
"""


def _create(directory: Path, output: Path, **options: object) -> dict[str, float]:
    """One ``create`` in a fresh process: its seconds and peak RSS (GiB)."""
    run = subprocess.run([sys.executable, "-c", _CHILD, str(directory), str(output), json.dumps(options)],
                         capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def _same_bytes(one: Path, other: Path) -> bool:
    """Two packs equal but for their creation time (see tests/test_scale.py)."""
    def content(pack: Path) -> tuple[object, bytes]:
        manifest = json.loads((pack / "skillpack.json").read_text())
        manifest.pop("created_at")
        manifest["files"]["skillpack.safetensors"].pop("sha256")
        data = (pack / "skillpack.safetensors").read_bytes()
        return manifest, data[8 + int.from_bytes(data[:8], "little"):]
    return content(one) == content(other)


def create_runs(args: argparse.Namespace, root: Path, floor: float | None) -> None:
    print("\n| layers | RTN s | RTN peak GiB | GPTQ s | GPTQ / RTN | GPTQ peak GiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    calib = {"calib_samples": 16, "calib_seqlen": 256}
    for layers in args.layers:
        directory = _checkpoints(root, args.width, args.mlp, args.kv, layers)
        rtn = _create(directory, root / "rtn")
        gptq = _create(directory, root / "gptq", calib=str(directory / "calib.txt"), **calib)
        print(f"| {layers} | {rtn['seconds']:.1f} | {rtn['peak_gb']:.2f} | {gptq['seconds']:.1f} | "
              f"{gptq['seconds'] / rtn['seconds']:.2f} | {gptq['peak_gb']:.2f} |", flush=True)
        if layers == args.layers[0]:
            first = directory, rtn, gptq
        for output in ("rtn", "gptq"):
            subprocess.run(["rm", "-rf", str(root / output)], check=True)
        if layers != args.layers[0]:
            subprocess.run(["rm", "-rf", str(directory)], check=True)
    directory, rtn, gptq = first
    if floor is not None:
        print(f"\ncreate, one {args.width}-wide layer, bfloat16, paper recipe, RTN: {rtn['seconds']:.1f} s = "
              f"{rtn['seconds'] / floor:.2f} x the floor (goal <= 1.5); with GPTQ: {gptq['seconds'] / rtn['seconds']:.2f}"
              f" x RTN (goal <= 2), peak {gptq['peak_gb']:.2f} GiB (goal <= 3)")
    print(f"\n| {args.layers[0]} layer, side by side | serial s | --workers 2 s | speed-up | byte-identical |")
    print("|---|---:|---:|---:|---|")
    for label, options in (("RTN", {}), ("GPTQ", {"calib": str(directory / "calib.txt"), **calib})):
        serial = _create(directory, root / "serial", **options)
        parallel = _create(directory, root / "parallel", workers=2, **options)
        print(f"| {label} | {serial['seconds']:.1f} | {parallel['seconds']:.1f} | "
              f"{serial['seconds'] / parallel['seconds']:.2f} | "
              f"{_same_bytes(root / 'serial', root / 'parallel')} |", flush=True)
    ray = _create(directory, root / "ray", executor="ray", workers=2)
    _create(directory, root / "serial")
    print(f"\n--executor ray --workers 2 (a local Ray started for the call), RTN: {ray['seconds']:.1f} s, "
          f"byte-identical to serial: {_same_bytes(root / 'serial', root / 'ray')}")


if __name__ == "__main__":
    main()
