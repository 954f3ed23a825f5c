"""The plugin operators (skillhub-dare, skillhub-bitdelta) against the paper recipe on the
test fine-tune (tiny Llama, `shift` task, 300 steps): bytes, relative error, exact match.

Embeddings and head stay magnitude-pruned (10%, 4-bit) and norms raw in every recipe, so
only the attention and MLP operators differ. Needs both plugins installed (`make install`).

    python bench/bench_plugins.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from skillhub import apply_packs, create_pack
from skillhub.scoring.scores import exact_match
from skillhub.progress import quiet_transformers
from skillhub.demo.synthetic import build_tiny_model, split_examples
from skillhub.demo.train import finetune


def recipe(attention: dict, mlp: dict) -> dict:
    return {"name": "plugins", "rules": [
        {"match": {"role": ["embedding", "head"]}, "operator": "magnitude-prune", "params": {"keep": 0.1, "bits": 4}},
        {"match": {"role": "attention"}, **attention},
        {"match": {"role": "mlp"}, **mlp},
        {"match": {"role": ["norm", "bias", "other"]}, "operator": "raw"},
    ]}


BITDELTA = {"operator": "bitdelta"}
RECIPES = {
    "paper (built-in)": "paper",
    "bitdelta attention + bitdelta MLP": recipe(BITDELTA, BITDELTA),
    "bitdelta attention + dare 0.5 MLP": recipe(BITDELTA, {"operator": "dare", "params": {"drop": 0.5}}),
    "bitdelta attention + dare 0.9 MLP": recipe(BITDELTA, {"operator": "dare", "params": {"drop": 0.9}}),
    "dare 0.9 attention + dare 0.9 MLP": recipe(*[{"operator": "dare", "params": {"drop": 0.9}}] * 2),
}


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="skillhub-bench-plugins-"))
    train, test = split_examples("shift", train=2000, test=200)
    base = build_tiny_model(root / "base", seed=0)
    tuned = finetune(base, train, root / "tuned", steps=300, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(base)

    def accuracy(path: Path) -> float:
        with quiet_transformers():
            return exact_match(AutoModelForCausalLM.from_pretrained(path), tokenizer, test)

    print(f"base exact match {accuracy(base):.3f}, fine-tune {accuracy(tuned):.3f}\n")
    print("| recipe | stored / fp16 delta | relative error | exact match |")
    print("|---|---:|---:|---:|")
    for number, (label, spec) in enumerate(RECIPES.items()):
        pack = create_pack(base, tuned, root / f"pack-{number}", task="shift", recipe=spec)
        apply_packs(base, [pack], root / f"model-{number}")
        totals = pack.manifest["totals"]
        print(f"| {label} | {totals['ratio']:.1%} | {totals['relative_error']:.3f} | "
              f"{accuracy(root / f'model-{number}'):.3f} |")


if __name__ == "__main__":
    main()
