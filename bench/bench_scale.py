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

    python bench/bench_scale.py [--width 4096 --mlp 14336 --kv 1024]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from skillhub import create_pack
from skillhub.compress.recipe import PAPER_RECIPE
from skillhub.numerics.svd import gram_svd, randomized_svd, truncated_svd
from skillhub.operators import get_operator, resolve_params
from skillhub.operators.builtin.svd import resolve_rank_groups
from skillhub.progress import quiet_transformers


def _delta(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    k = 1024
    left = torch.randn(rows, k, generator=generator) / rows**0.5
    right = torch.randn(k, cols, generator=generator) / cols**0.5
    signal = (left * torch.arange(1, k + 1).pow(-0.5)) @ right
    noise = torch.randn(rows, cols, generator=generator)
    noise *= 0.1**0.5 * signal.norm() / noise.norm()
    return (signal + noise) * 1e-3


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
    args = parser.parse_args()
    torch.set_num_threads(2)
    w, f, kv = args.width, args.mlp, args.kv
    matrices = {"q_proj": ("attention", w, w), "k_proj": ("attention", kv, w), "v_proj": ("attention", kv, w),
                "o_proj": ("attention", w, w), "gate_proj": ("mlp", f, w), "up_proj": ("mlp", f, w),
                "down_proj": ("mlp", w, f)}
    operator = get_operator("svd-mixed")
    print("| matrix | shape | rank | Gram fp64 s | Gram fp32 s | skillhub s | full SVD s | randomized s | "
          "pack error skillhub | pack error full SVD |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    totals = {"floor": 0.0, "floor32": 0.0, "skillhub": 0.0, "full": 0.0, "randomized": 0.0}
    worst = 0.0
    for seed, (name, (role, rows, cols)) in enumerate(matrices.items()):
        matrix = _delta(rows, cols, seed)
        params = resolve_params(operator, next(r["params"] for r in PAPER_RECIPE["rules"]
                                              if r["match"]["role"] == role), where="bench")
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
    print(f"\nskillhub / floor: {totals['skillhub'] / fastest_floor:.2f} (goal <= 1.5); "
          f"full SVD / floor: {totals['full'] / fastest_floor:.2f}; "
          f"worst pack error vs the full SVD's: {worst:+.3%} (goal within 1%)")
    seconds = create_one_layer(w, f, kv, matrices)
    print(f"\ncreate, one {w}-wide layer, bfloat16, paper recipe: {seconds:.1f} s = "
          f"{seconds / fastest_floor:.2f} x the floor (goal <= 1.5)")


def create_one_layer(width: int, mlp: int, kv: int, matrices: dict) -> float:
    """Seconds of ``create_pack`` on a one-layer Llama of this width whose delta is the bench's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=1,
                         num_attention_heads=width // 128, num_key_value_heads=kv // 128, vocab_size=256,
                         tie_word_embeddings=False, torch_dtype="bfloat16")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        with quiet_transformers():
            model = LlamaForCausalLM(config).to(torch.bfloat16)
            model.save_pretrained(root / "base")
        layer = model.model.layers[0]
        owners = {"q_proj": layer.self_attn, "k_proj": layer.self_attn, "v_proj": layer.self_attn,
                  "o_proj": layer.self_attn, "gate_proj": layer.mlp, "up_proj": layer.mlp, "down_proj": layer.mlp}
        with torch.no_grad():
            for seed, (name, (_, rows, cols)) in enumerate(matrices.items()):
                weight = getattr(owners[name], name).weight
                weight += _delta(rows, cols, seed).to(weight.dtype)
        with quiet_transformers():
            model.save_pretrained(root / "tuned")
        del model
        start = time.perf_counter()
        create_pack(root / "base", root / "tuned", root / "pack", task="scale")
        return time.perf_counter() - start


if __name__ == "__main__":
    main()
