"""The embedded end-to-end default behind ``skillhub demo`` and ``make demo``.

Builds a tiny Llama-architecture base model, teaches it a synthetic task by full
fine-tuning, compresses the delta into a SkillPack with the ``paper`` recipe, applies
the pack to the base, and scores base, fine-tuned and base + pack on held-out prompts.
Everything runs on CPU from nothing but a fixed seed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from skillhub.activate import apply_packs
from skillhub.compress import create_pack
from skillhub.evaluate import exact_match
from skillhub.progress import ProgressCallback, no_progress, quiet_transformers
from skillhub.synthetic import build_tiny_model, split_examples
from skillhub.train import finetune

DEMO_TASK = "shift"


def run_demo(
    workdir: str | os.PathLike[str], *, fast: bool = False, progress: ProgressCallback = no_progress
) -> dict[str, Any]:
    """Run the demo in ``workdir`` (replacing earlier demo output there) and return its measurements."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    steps = 150 if fast else 300
    train, test = split_examples(DEMO_TASK, train=2000, test=200)
    base_dir = build_tiny_model(workdir / "base", seed=0)
    tuned_dir = workdir / "tuned"
    finetune(base_dir, train, tuned_dir, steps=steps, progress=progress)
    pack = create_pack(base_dir, tuned_dir, workdir / "packs" / DEMO_TASK, task=DEMO_TASK, force=True, progress=progress)
    applied_dir = apply_packs(base_dir, [pack], workdir / f"{DEMO_TASK}-model", force=True, progress=progress)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    accuracy = {}
    for label, directory in (("base", base_dir), ("tuned", tuned_dir), ("applied", applied_dir)):
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        accuracy[label] = exact_match(model, tokenizer, test)
    totals = pack.manifest["totals"]
    return {
        "task": DEMO_TASK,
        "train_steps": steps,
        "test_examples": len(test),
        "accuracy": accuracy,
        "pack": {
            "recipe": pack.manifest["recipe"]["name"],
            "stored_bytes": totals["stored_bytes"],
            "delta_fp16_bytes": totals["delta_fp16_bytes"],
            "ratio": totals["ratio"],
            "relative_error": totals["relative_error"],
        },
        "paths": {"base": str(base_dir), "tuned": str(tuned_dir), "pack": str(pack.path), "applied": str(applied_dir)},
    }
