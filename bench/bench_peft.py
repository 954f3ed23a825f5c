"""PEFT LoRA in and out, measured side by side in one run.

For two models (the suite's tiny Llama fine-tuned on ``shift``, and a wider bfloat16 Llama with a
synthetic fine-tune delta: low-rank updates plus noise on every layer matrix, sparse rows of the
embedding and head):

- export: ``export --format peft`` (exact, with modules_to_save) timed against its floor, decoding
  every module of the pack; adapter bytes against the pack's and the dense fp16 delta's; the
  logit error of the exact export (factors in the base's dtype, and in float32) and of vLLM-capped
  exports (rank 512, 64, 16: attention and MLP only), with the share of delta energy the caps drop;
- import: ``create --from-peft`` of a rank-16 adapter on every linear layer, exactly and compressed
  (paper recipe), timed against what a user does without skillhub to get the same weights:
  PEFT's ``PeftModel.from_pretrained`` + ``merge_and_unload``.

Times are medians of ``--rounds`` runs, alternating order.

    python bench/bench_peft.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from skillhub import create_pack  # noqa: E402
from skillhub.compress.options import CompressionOptions  # noqa: E402
from skillhub.demo.synthetic import build_tiny_model, build_tokenizer, split_examples, tiny_llama_config  # noqa: E402
from skillhub.demo.train import finetune  # noqa: E402
from skillhub.sharing.peft_export import export_peft  # noqa: E402
from skillhub.sharing.peft_import import import_peft  # noqa: E402


def _wide_model(root: Path) -> tuple[Path, Path]:
    """A bfloat16 Llama (hidden 1024, MLP 2816, 4 layers, vocab 8192) and a synthetic fine-tune of it."""
    from transformers import AutoModelForCausalLM

    config = tiny_llama_config(layers=4, hidden=1024, intermediate=2816, vocab_size=8192)
    config.num_attention_heads, config.num_key_value_heads = 16, 8
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(root / "wide-base")
    build_tokenizer().save_pretrained(root / "wide-base")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() != 2:
                continue
            rows, cols = parameter.shape
            if "embed" in name or "lm_head" in name:  # a few hundred token rows move
                chosen = torch.randperm(rows, generator=generator)[:256]
                parameter[chosen] += 0.02 * torch.randn(256, cols, generator=generator).to(parameter.dtype)
                continue
            low = torch.randn(rows, 32, generator=generator) @ torch.randn(32, cols, generator=generator)
            noise = torch.randn(rows, cols, generator=generator)
            update = 2e-3 * low / 32 ** 0.5 + 2e-4 * noise
            parameter.copy_((parameter.float() + update).to(parameter.dtype))
    model.save_pretrained(root / "wide-tuned")
    build_tokenizer().save_pretrained(root / "wide-tuned")
    return root / "wide-base", root / "wide-tuned"


def _tiny_model(root: Path) -> tuple[Path, Path]:
    train, _ = split_examples("shift", train=2000, test=10)
    base = build_tiny_model(root / "tiny-base", seed=0)
    return base, finetune(base, train, root / "tiny-tuned", steps=300, seed=0)


def _adapter(base: Path, output: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype="auto"),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.01)
    model.save_pretrained(output)
    return output


def _peft_merge(base: Path, adapter: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype="auto"), str(adapter)).merge_and_unload()


def _median_pair(rounds: int, first, second) -> tuple[float, float]:
    """Median seconds of two callables, timed back to back, alternating which goes first."""
    times: tuple[list[float], list[float]] = ([], [])
    for round_number in range(rounds):
        order = (0, 1) if round_number % 2 == 0 else (1, 0)
        for index in order:
            started = time.perf_counter()
            (first, second)[index]()
            times[index].append(time.perf_counter() - started)
    return statistics.median(times[0]), statistics.median(times[1])


def _measure(label: str, base: Path, tuned: Path, work: Path, rounds: int) -> dict:
    pack = create_pack(base, tuned, work / f"{label}-pack", task="bench")
    dense = pack.manifest["totals"]["delta_fp16_bytes"]

    def export_exact():
        return export_peft(pack, work / f"{label}-exact", base=base, check=False, force=True)

    def decode_all():
        for name in pack.modules:
            pack.decode(name)

    export_seconds, floor_seconds = _median_pair(rounds, export_exact, decode_all)
    exact = export_peft(pack, work / f"{label}-exact", base=base, force=True)
    exact32 = export_peft(pack, work / f"{label}-exact32", base=base, dtype="float32", force=True)
    row = {"model": label, "pack_bytes": pack.manifest.stored_bytes, "dense_fp16_bytes": dense,
           "export_seconds": export_seconds, "decode_floor_seconds": floor_seconds,
           "export_vs_floor": export_seconds / floor_seconds, "exact": _summary(exact),
           "exact_float32": _summary(exact32), "vllm": []}
    for cap in (512, 64, 16):
        capped = export_peft(pack, work / f"{label}-vllm-{cap}", base=base, for_vllm=True, max_rank=cap, force=True)
        row["vllm"].append({"max_rank": cap, **_summary(capped)})

    adapter = _adapter(base, work / f"{label}-adapter")
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size

    def lossless():
        import_peft(adapter, base, work / f"{label}-imported", force=True)

    def merged():
        _peft_merge(base, adapter)

    import_seconds, merge_seconds = _median_pair(rounds, lossless, merged)
    started = time.perf_counter()
    compressed = import_peft(adapter, base, work / f"{label}-imported-c", force=True, compression=CompressionOptions())
    row["import"] = {"adapter_bytes": adapter_bytes, "lossless_seconds": import_seconds,
                     "peft_merge_seconds": merge_seconds, "lossless_vs_peft_merge": import_seconds / merge_seconds,
                     "compressed_seconds": time.perf_counter() - started,
                     "compressed_pack_bytes": compressed.manifest.stored_bytes,
                     "compressed_relative_error": compressed.manifest["totals"]["relative_error"]}
    return row


def _summary(result) -> dict:
    lora = [m for m in result.modules if m.action == "lora"]
    return {"adapter_bytes": result.adapter_bytes, "rank": result.rank, "targets": result.target_modules,
            "dropped": sum(m.action == "dropped" for m in result.modules),
            "max_energy_lost_lora": max((m.energy_lost for m in lora), default=0.0),
            "logit_relative_error": result.check.relative_error, "logit_max_abs_error": result.check.max_abs_error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="skillhub-bench-peft-"))
    try:
        rows = [_measure("tiny", *_tiny_model(work), work, args.rounds),
                _measure("wide", *_wide_model(work), work, args.rounds)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(rows, indent=2))
    print("\n| model | pack | dense fp16 | exact adapter | export / decode floor | exact logit error (float32 factors) | "
          "vLLM 512 / 64 / 16: relative logit error | import (lossless) / PEFT merge |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        vllm = " / ".join(f"{v['logit_relative_error']:.3g}" for v in row["vllm"])
        print(f"| {row['model']} | {row['pack_bytes']:,} | {row['dense_fp16_bytes']:,} | "
              f"{row['exact']['adapter_bytes']:,} | {row['export_vs_floor']:.2f}x ({row['export_seconds']:.2f} s) | "
              f"{row['exact']['logit_relative_error']:.2g} ({row['exact_float32']['logit_relative_error']:.2g}) | {vllm} | "
              f"{row['import']['lossless_vs_peft_merge']:.2f}x ({row['import']['lossless_seconds']:.2f} s) |")


if __name__ == "__main__":
    main()
