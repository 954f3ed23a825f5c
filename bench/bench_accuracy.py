"""Task accuracy of whole packs (base + pack, as `skillhub apply` writes it) per quantizer.

For each synthetic task, builds the same copy-pretrained tiny Llama and full fine-tune as
bench_compress.py, then makes packs with the paper recipe (round-to-nearest, then GPTQ with
calibration) and with budget mode at the paper recipe's size and at 5%, and scores each
applied model by exact match on held-out prompts. A few minutes on 2 cores.

    python bench/bench_accuracy.py [--tasks reverse sort]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_compress import build_finetune  # noqa: E402

from skillhub import apply_packs, create_pack  # noqa: E402
from skillhub.scoring.datasets import load_eval_set
from skillhub.scoring.scores import exact_match  # noqa: E402
from skillhub.progress import quiet_transformers  # noqa: E402


def accuracy(model_dir: Path, examples: list[dict[str, str]]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return exact_match(model, AutoTokenizer.from_pretrained(model_dir), examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["reverse", "sort"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("| task | fine-tune | paper, RTN | paper, GPTQ | budget (GPTQ), same bytes | budget (GPTQ), 5% |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            root = Path(tmp) / task
            base, tuned, calib, eval_file = build_finetune(root, task)
            examples = load_eval_set(eval_file)
            calibration = {"calib": calib, "calib_samples": 64, "calib_seqlen": 64}
            paper_rtn = create_pack(base, tuned, root / "rtn", task=task)
            ratio = paper_rtn.manifest["totals"]["ratio"]
            packs = [
                ("rtn", paper_rtn),
                ("gptq", create_pack(base, tuned, root / "gptq", task=task, **calibration)),
                ("budget", create_pack(base, tuned, root / "budget", task=task, ratio=ratio, **calibration)),
                ("budget5", create_pack(base, tuned, root / "budget5", task=task, ratio=0.05, **calibration)),
            ]
            cells = [f"{accuracy(tuned, examples):.1%}"]
            for label, pack in packs:
                applied = apply_packs(base, [pack], root / f"{label}-model")
                cells.append(f"{accuracy(applied, examples):.1%} ({pack.manifest['totals']['ratio']:.2%})")
            print(f"| {task} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
