"""The embedded end-to-end default behind ``skillhub demo`` and ``make demo``.

A tiny Llama-architecture base model is pretrained briefly on a generic copy task, then
three synthetic tasks (shift, reverse, sort) are learned in sequence, two ways:

1. sequential full fine-tuning of one model (task 1, then task 2 on top, then task 3);
2. skillhub: each task fully fine-tuned from the base, compressed into a pack (paper recipe,
   GPTQ calibrated on the task's training prompts), added to a fresh registry with its eval
   set; every addition scores every task under its own activation set (Eq. 10) and under
   all packs fused (Eq. 9).

Then the second task's pack is removed, and the tasks are scored again: that task falls back
to the base model's score while the others keep exactly their scores. Everything runs on CPU
from a fixed seed; nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from skillhub.compress.pipeline import create_pack
from skillhub.evaluation.scoring import exact_match
from skillhub.evaluation.forgetting import accuracy_matrices, evaluate_tasks, plot_matrices
from skillhub.evaluation.metrics import continual_metrics
from skillhub.io.outputs import replace_directory
from skillhub.progress import ProgressCallback, no_progress, quiet_transformers
from skillhub.registry.front import Registry
from skillhub.demo.synthetic import build_tiny_model, make_examples, split_examples, write_jsonl
from skillhub.demo.train import finetune

DEMO_TASKS = ("shift", "reverse", "sort")


def _copy_task(count: int) -> list[dict[str, str]]:
    examples = []
    for task in ("shift", "reverse", "sort", "add"):
        for example in make_examples(task, count, seed=99):
            word = example["prompt"].split(" ", 1)[1].rstrip("=")
            examples.append({"prompt": f"copy {word}=", "answer": word})
    return examples


def run_demo(
    workdir: str | os.PathLike[str], *, fast: bool = False, progress: ProgressCallback = no_progress
) -> dict[str, Any]:
    """Run the demo in ``workdir`` (replacing earlier demo output there) and return its measurements."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir = replace_directory(workdir, kind="demo")
    steps = 150 if fast else 500
    test_size = 100 if fast else 200
    data = {t: split_examples(t, train=2000, test=test_size) for t in DEMO_TASKS}

    initial = build_tiny_model(workdir / "init", seed=0)
    base = finetune(initial, _copy_task(250 if fast else 1000), workdir / "base", steps=steps // 2 + 50,
                    learning_rate=3e-3, progress=progress)
    shutil.rmtree(initial)
    tokenizer = AutoTokenizer.from_pretrained(base)

    def scores(model_dir: Path) -> list[float]:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return [exact_match(model, tokenizer, data[t][1]) for t in DEMO_TASKS]

    base_scores = scores(base)

    # 1. Sequential full fine-tuning of one model.
    sequential, current = [], base
    for task in DEMO_TASKS:
        current = finetune(current, data[task][0], workdir / "sequential" / task, steps=steps, learning_rate=1e-3,
                           progress=progress)
        sequential.append(scores(current))

    # 2. skillhub: a pack per task, added in sequence to a fresh registry with eval sets.
    registry = Registry(workdir / "registry")
    pack_ids = _add_in_sequence(registry, base, data, workdir, steps, progress)
    result = accuracy_matrices(registry)
    result["policies"] = {"sequential fine-tuning": {"R": sequential, "complete": True,
                                                     "metrics": continual_metrics(sequential, base_scores)},
                          **result["policies"]}

    # 3. Unlearn the second task by removing its pack.
    removed = DEMO_TASKS[1]
    before = {r["task"]: r["score"] for r in evaluate_tasks(registry) if r["policy"] == "subset"}
    registry.remove(pack_ids[removed])
    after = {r["task"]: r["score"] for r in evaluate_tasks(registry) if r["policy"] == "subset"}

    plot = workdir / "forgetting.png"
    try:
        plot_matrices(result, str(plot))
    except Exception:  # noqa: BLE001 - the plot is optional (matplotlib is an extra)
        plot = None
    shutil.rmtree(workdir / "sequential")  # intermediate checkpoints; the packs and registry are what remain
    return {
        "tasks": list(DEMO_TASKS),
        "fast": fast,
        "train_steps": steps,
        "test_examples": test_size,
        "matrices": result,
        "removal": {"task": removed, "pack": pack_ids[removed], "base": base_scores[1], "before": before,
                    "after": after},
        "packs": {t: {"id": i, "ratio": registry.show(i).ratio} for t, i in pack_ids.items()},
        "paths": {"registry": str(registry.url), "packs": str(workdir / "packs"), "base": str(base),
                  "plot": str(plot) if plot else None},
    }


def _add_in_sequence(registry: Registry, base: Path, data: dict[str, Any], workdir: Path, steps: int,
                     progress: ProgressCallback) -> dict[str, str]:
    """Fine-tune the base on each task, pack it (calibrated), add it, score every task; returns pack ids."""
    pack_ids = {}
    for number, task in enumerate(DEMO_TASKS):
        train, _ = data[task]
        tuned = finetune(base, train, workdir / "tuned" / task, steps=steps, learning_rate=1e-3, progress=progress)
        calib = write_jsonl(train[:400], workdir / "tuned" / task / "calib.jsonl")
        pack = create_pack(base, tuned, workdir / "packs" / task, task=task, calib=calib, calib_samples=64,
                           calib_seqlen=64, progress=progress)
        entry = registry.add(pack, task=task, base_location=str(base))
        if number == 0:  # the first add registers the base; now every task can get its eval set
            for each in DEMO_TASKS:
                registry.add_task(each, write_jsonl(data[each][1], workdir / "packs" / f"{each}-eval.jsonl"))
        evaluate_tasks(registry, step=entry.event, progress=progress)
        pack_ids[task] = entry.id
    return pack_ids
