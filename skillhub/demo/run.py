"""The embedded end-to-end default behind ``skillhub demo`` and ``make demo``.

A tiny Llama-architecture base model is pretrained briefly on a generic copy task (``copy``:
the base model's own skill, a task with an eval set and no pack). Then four tasks are learned
in sequence: ``shift`` and ``back`` (named by a task word), ``mirror`` and ``inc`` (no task
word: a bare word or a bare number, recognisable only from the input itself). Two ways:

1. sequential full fine-tuning of one model (each task on top of the last);
2. skillhub: each task fully fine-tuned from the base, compressed into a pack (paper recipe,
   GPTQ calibrated on the task's training prompts), added to a fresh registry with its eval
   set and its training prompts as routing examples; after every addition the router is
   retrained and every task scored under its own activation set (Eq. 10), routed without its
   task label (Eq. 9, routed), all packs summed (Eq. 9, naive) and all packs TIES-merged.

At the end: each pack's accuracy against its fine-tune's (retention), merges by DARE too,
then the second task's pack is removed: it falls back to the base model's score, and the
router never sends a prompt to it again, while every other task keeps exactly its scores.
Last, grafting (paper §3.2): a tiny GPT-2, with a tokenizer whose every token id differs from
the base's, learns ``rot`` (ROT13, which the base cannot do); ``skillhub graft`` has it answer
1,000 prompts, keeps its correct answers, fine-tunes the base on them (SFT, then DPO on its
best-vs-worst pairs, on TRL), packs the delta and adds it, and every other task keeps its score.
Everything runs on CPU from a fixed seed; nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from skillhub.activation import Merge
from skillhub.compress.pipeline import create_pack
from skillhub.evaluation.forgetting import accuracy_matrices, evaluate_tasks, plot_matrices
from skillhub.scoring.metrics import continual_metrics
from skillhub.scoring.scores import exact_match
from skillhub.io.outputs import replace_directory
from skillhub.progress import ProgressCallback, no_progress, quiet_transformers
from skillhub.registry.front import Registry
from skillhub.routing.training import train_router
from skillhub.compress.options import CompressionOptions
from skillhub.demo.synthetic import build_tiny_model, build_tiny_source, split_examples, write_jsonl
from skillhub.demo.train import finetune

DEMO_TASKS = ("shift", "back", "mirror", "inc")
BASE_TASK = "copy"  # what the base model itself does; no pack
LEARNING_RATE = 5e-4  # small task deltas, as real fine-tunes have: they merge better
FINAL_MERGES = ("ties", "dare-ties", "dare-linear", "task-arithmetic")
GRAFT_TASK = "rot"  # grafted at the end from a GPT-2 source with its own tokenizer


def run_demo(workdir: str | os.PathLike[str], *, fast: bool = False, seed: int = 0, keep_finetunes: bool = False,
             progress: ProgressCallback = no_progress) -> dict[str, Any]:
    """Run the demo in ``workdir`` (replacing earlier demo output there) and return its measurements.

    ``keep_finetunes`` keeps each task's full fine-tune (``workdir/tuned/TASK``), e.g. to merge
    them with another tool; by default only the packs remain of them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir = replace_directory(workdir, kind="demo")
    steps = 200 if fast else 400
    test_size = 100 if fast else 200
    data = {t: split_examples(t, train=2000, test=test_size, seed=seed) for t in (BASE_TASK, *DEMO_TASKS)}

    initial = build_tiny_model(workdir / "init", seed=seed)
    base = finetune(initial, data[BASE_TASK][0], workdir / "base", steps=2 * steps, learning_rate=3e-3, seed=seed,
                    progress=progress)
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
        current = finetune(current, data[task][0], workdir / "sequential" / task, steps=steps, learning_rate=LEARNING_RATE,
                           seed=seed, progress=progress)
        sequential.append(scores(current))

    # 2. skillhub: a pack per task, added in sequence to a fresh registry with eval sets and a router.
    registry = Registry(workdir / "registry")
    pack_ids, finetuned = _add_in_sequence(registry, base, data, workdir, steps, seed, keep_finetunes, progress)
    result = accuracy_matrices(registry)
    result["policies"] = {"sequential fine-tuning": {"R": sequential, "complete": True,
                                                     "metrics": continual_metrics(sequential, base_scores)},
                          **result["policies"]}
    final = {policy: dict(zip(result["tasks"], data_["R"][-1])) for policy, data_ in result["policies"].items()}
    merges = _final_merges(registry, data)

    # 3. Unlearn the second task by removing its pack.
    removed = DEMO_TASKS[1]

    def by_policy(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
        table: dict[str, dict[str, float]] = {}
        for r in records:
            table.setdefault(r["policy"], {})[r["task"]] = r["score"]
        return table

    before = by_policy(evaluate_tasks(registry, merge=None))
    registry.remove(pack_ids[removed])
    after = by_policy(evaluate_tasks(registry, merge=None))

    grafting = _graft_step(registry, base, workdir, seed, progress)

    plot = workdir / "forgetting.png"
    try:
        plot_matrices(result, str(plot))
    except Exception:  # noqa: BLE001 - the plot is optional (matplotlib is an extra)
        plot = None
    shutil.rmtree(workdir / "sequential")  # intermediate checkpoints; the packs and registry are what remain
    router = registry.stored_router()
    return {
        "tasks": list(DEMO_TASKS),
        "base_task": BASE_TASK,
        "fast": fast,
        "seed": seed,
        "train_steps": steps,
        "test_examples": test_size,
        "matrices": result,
        "retention": {t: {"fine-tune": finetuned[t], "pack": final["subset"][t],
                          "retained": final["subset"][t] / finetuned[t] if finetuned[t] else None}
                      for t in DEMO_TASKS},
        "final": {**final, **merges},
        "routing": {"accuracy": router.spec["info"]["accuracy"], "layer": router.spec["layer"]} if router else None,
        "removal": {"task": removed, "pack": pack_ids[removed], "base": base_scores[1], "before": before,
                    "after": after},
        "graft": grafting,
        "packs": {t: {"id": i, "ratio": registry.show(i).ratio} for t, i in pack_ids.items()},
        "paths": {"registry": str(registry.url), "packs": str(workdir / "packs"), "base": str(base),
                  "plot": str(plot) if plot else None,
                  "finetunes": {t: str(workdir / "tuned" / t) for t in DEMO_TASKS} if keep_finetunes else None},
    }


def _add_in_sequence(registry: Registry, base: Path, data: dict[str, Any], workdir: Path, steps: int, seed: int,
                     keep_finetunes: bool, progress: ProgressCallback) -> tuple[dict[str, str], dict[str, float]]:
    """Fine-tune the base on each task, pack it (calibrated), add it, (re)train the router, score every
    task; returns the pack ids and each fine-tune's own score."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pack_ids, finetuned = {}, {}
    files = workdir / "packs"
    for number, task in enumerate(DEMO_TASKS):
        train, test = data[task]
        tuned = finetune(base, train, workdir / "tuned" / task, steps=steps, learning_rate=LEARNING_RATE, seed=seed,
                         progress=progress)
        with quiet_transformers():
            finetuned[task] = exact_match(AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32),
                                          AutoTokenizer.from_pretrained(tuned), test)
        calib = write_jsonl(train[:400], workdir / "tuned" / task / "calib.jsonl")
        pack = create_pack(base, tuned, files / task, task=task, calib=calib, calib_samples=64,
                           calib_seqlen=64, progress=progress)
        if not keep_finetunes:
            shutil.rmtree(tuned)  # the pack is what remains of the fine-tune
        entry = registry.add(pack, task=task, base_location=str(base))
        if number == 0:  # the first add registers the base; now every task can get its sets
            for each in (BASE_TASK, *DEMO_TASKS):
                registry.add_task(each, write_jsonl(data[each][1], files / f"{each}-eval.jsonl"))
                registry.add_routing_examples(each, write_jsonl(data[each][0][:300], files / f"{each}-route.jsonl"))
            train_router(registry, progress=progress)
        evaluate_tasks(registry, step=entry.event, progress=progress)  # retrains the router, made stale by the add
        pack_ids[task] = entry.id
    return pack_ids, finetuned


def graft_settings(*, sft_epochs: float = 8) -> dict[str, Any]:
    """How the demo grafts (``graft`` keyword arguments; ``bench/bench_graft.py`` varies the SFT
    epochs): 4 samples at temperature 1.5, right answers only, and learning rates for these
    tiny models, not the paper's for 7B ones."""
    from skillhub.graft import GenerationSettings, TrainingSettings

    return {"generation": GenerationSettings(samples=4, temperature=1.5, max_new_tokens=8), "min_score": 1.0,
            "sft": TrainingSettings(learning_rate=LEARNING_RATE, epochs=sft_epochs, batch_size=16),
            "dpo": TrainingSettings(learning_rate=5e-5, epochs=2, batch_size=16)}


def train_graft_source(folder: Path, train: list[dict[str, str]], *, seed: int,
                       progress: ProgressCallback = no_progress) -> Path:
    """The demo's grafting source: a tiny GPT-2 with its own tokenizer, trained on ``train``
    (``folder/source``)."""
    source = finetune(build_tiny_source(folder / "source-init", seed=seed), train, folder / "source", steps=600,
                      learning_rate=3e-3, seed=seed, progress=progress)
    shutil.rmtree(folder / "source-init")
    return source


def _graft_step(registry: Registry, base: Path, workdir: Path, seed: int,
                progress: ProgressCallback) -> dict[str, Any]:
    """Graft GRAFT_TASK from a GPT-2 source (its own tokenizer: every token id differs) into the
    base, add the pack, and score every stage; or say why not (TRL missing)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from skillhub.errors import GraftError
    from skillhub.graft import graft
    from skillhub.graft.training import require_trl

    try:
        require_trl()
    except GraftError as exc:
        return {"task": GRAFT_TASK, "skipped": str(exc)}
    train, test = split_examples(GRAFT_TASK, train=1000, test=200, seed=seed)

    def score(model_dir: Path) -> float:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return exact_match(model, AutoTokenizer.from_pretrained(model_dir), test)

    folder = workdir / "graft"
    source = train_graft_source(folder, train, seed=seed, progress=progress)
    others_before = {r["task"]: r["score"] for r in evaluate_tasks(registry, merge=None) if r["policy"] == "subset"}
    result = graft(source, base, write_jsonl(train, folder / "prompts.jsonl"), workdir / "packs" / GRAFT_TASK,
                   task=GRAFT_TASK, work_dir=folder / "work", **graft_settings(),
                   compression=CompressionOptions(seed=seed), keep=True, add_to=registry,
                   eval_file=write_jsonl(test, workdir / "packs" / f"{GRAFT_TASK}-eval.jsonl"), progress=progress)
    tuned = {"sft": score(folder / "work" / "sft"),
             "dpo": score(folder / "work" / "dpo") if (folder / "work" / "dpo").is_dir() else None}
    shutil.rmtree(folder / "work" / "sft")
    shutil.rmtree(folder / "work" / "dpo", ignore_errors=True)
    after = {r["task"]: r["score"] for r in result.added.scores if r["policy"] == "subset"}
    manifest = result.pack.manifest
    return {
        "task": GRAFT_TASK, "source": {"architecture": "GPT2LMHeadModel", "score": score(source)},
        "target_before": score(base), **tuned, "pack": after[GRAFT_TASK], "pack_bytes": manifest.stored_bytes,
        "ratio": manifest.ratio, "pairs": result.pairs, "sft_examples": result.sft_examples, "seconds": result.seconds,
        "others": {t: {"before": others_before[t], "after": after[t]} for t in others_before},
        "pack_id": result.added.entry.id,
    }


def _final_merges(registry: Registry, data: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Every task's score with all packs merged by each of FINAL_MERGES (TIES is also a matrix policy)."""
    model, tokenizer, _ = registry.load_base_model()
    active = [p.id for p in registry.list_packs()]
    merges = {}
    for method in FINAL_MERGES:
        with registry.activated(model, packs=active, verify=False, merge=Merge(method)):
            merges[method] = {t: exact_match(model, tokenizer, data[t][1]) for t in DEMO_TASKS}
    return merges
