"""Fusion: routed vs own-set activation vs merged packs, and the cost of routing in generation.

1. Runs the demo (four tasks, two of them with no task word) and prints, per task, the score
   of the full fine-tune, of its pack under the task's own activation set, routed without the
   task label, and with every pack merged into one static model by sum, task arithmetic, TIES,
   DARE-linear and DARE-TIES (PEFT's implementations, through skillhub).
2. The same merges done by mergekit on the full fine-tuned checkpoints (what a user would
   otherwise run), against skillhub's merges of the compressed packs, for all four tasks and
   for the pair mergekit and skillhub find least conflicting. mergekit runs from its own
   virtual environment (`make bench-venv` makes `.venv-mergekit`); its TIES/DARE-TIES are set
   to normalize (as PEFT's disjoint mean does) and its task arithmetic/DARE-linear not to.
3. The router's feature layer: trained at every layer of the base (0: the embeddings), its
   held-out accuracy and its `route eval` accuracy (what the default layer is chosen from).
4. Routing overhead: the same prompts answered with `generate --route` and with `generate
   --task T` (grouped by task), 32-token answers (end-of-sequence suppressed until 32 tokens),
   arms alternated, median ratio of wall times. Goal: <= 1.10.

    python bench/bench_fusion.py [--fast] [--seed 0] [--repeats 5] [--mergekit .venv-mergekit/bin/mergekit-yaml]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from skillhub.activation import Merge
from skillhub.demo.run import run_demo
from skillhub.scoring.datasets import load_eval_set
from skillhub.scoring.scores import exact_match
from skillhub.progress import quiet_transformers
from skillhub.demo.synthetic import split_examples
from skillhub.registry.front import Registry
from skillhub.routing.evaluation import evaluate_router
from skillhub.routing.generate import Generator
from skillhub.routing.training import train_router


def overhead(registry: Registry, tasks: list[str], repeats: int, per_task: int = 16) -> tuple[float, float, float]:
    prompts = {t: [e["prompt"] for e in split_examples(t, train=0, test=per_task, seed=42)[1]] for t in tasks}
    everything = [p for t in tasks for p in prompts[t]]
    with Generator(registry, max_new_tokens=32, cache_sets=len(tasks)) as generator:
        generator.model.generation_config.min_new_tokens = 32  # 32-token answers in both arms
        labelled, routed = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            for task in tasks:
                generator.generate(prompts[task], task=task)
            labelled.append(time.perf_counter() - start)
            start = time.perf_counter()
            generator.generate(everything, route=True)
            routed.append(time.perf_counter() - start)
    return statistics.median(routed) / statistics.median(labelled), statistics.median(labelled), statistics.median(routed)


def layer_sweep(registry: Registry, layers: int) -> None:
    print("\nRouter feature layer (0: embeddings): held-out accuracy | route eval accuracy")
    print("| layer | held-out | route eval |")
    print("|---:|---:|---:|")
    for layer in range(layers + 1):
        trained = train_router(registry, layer=layer)
        report = evaluate_router(registry)
        print(f"| {layer} | {trained.router.info['accuracy']['heldout']:.4f} | {report.accuracy:.4f} |")


MERGEKIT = {"task-arithmetic": ("task_arithmetic", False), "ties": ("ties", True),
            "dare-linear": ("dare_linear", False), "dare-ties": ("dare_ties", True)}


def mergekit_scores(mergekit: str, base: str, finetunes: dict[str, str], eval_sets: dict[str, list[dict[str, str]]],
                    method: str, scratch: Path) -> dict[str, float]:
    """Merge the full fine-tunes with mergekit (its CLI, its own venv) and score the merged model."""
    name, normalize = MERGEKIT[method]
    models = [{"model": path, "parameters": {"weight": 1.0, **({"density": 0.5} if method != "task-arithmetic" else {})}}
              for path in finetunes.values()]
    config = {"merge_method": name, "base_model": base, "models": models, "dtype": "float32",
              "parameters": {"normalize": normalize, "lambda": 1.0}}
    out = scratch / f"mergekit-{method}-{len(finetunes)}"
    config_file = scratch / f"{out.name}.yml"
    config_file.write_text(json.dumps(config))  # JSON is YAML
    subprocess.run([mergekit, str(config_file), str(out), "--copy-tokenizer"], check=True, capture_output=True)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    return {t: exact_match(model, tokenizer, eval_sets[t]) for t in finetunes}


def skillhub_scores(registry: Registry, ids: dict[str, str], eval_sets: dict[str, list[dict[str, str]]],
                    method: str) -> dict[str, float]:
    model, tokenizer, _ = registry.load_base_model()
    merge = None if method == "sum" else Merge(method)
    with registry.activated(model, packs=list(ids.values()), verify=False, merge=merge):
        return {t: exact_match(model, tokenizer, eval_sets[t]) for t in ids}


def compare_with_mergekit(mergekit: str, result: dict, scratch: Path) -> None:
    registry = Registry(result["paths"]["registry"])
    # The demo removed one pack at its end: add it back so every task has its pack again.
    removed = result["removal"]["task"]
    registry.add(Path(result["paths"]["packs"]) / removed, task=removed)
    ids = {p.task: p.id for p in registry.list_packs()}
    eval_sets = {s.name: load_eval_set(s.path) for s in registry.eval_sets()}
    finetunes = result["paths"]["finetunes"]
    for tasks in (list(result["tasks"]), ["mirror", "inc"]):
        print(f"\nMerging {' + '.join(tasks)}: exact match per task (skillhub on packs | mergekit on full "
              "fine-tunes); task arithmetic with lambda 1 is the plain sum")
        print("| method | " + " | ".join(tasks) + " | mean |")
        print("|---|" + "---:|" * (len(tasks) + 1))
        for method in ("task-arithmetic", "ties", "dare-linear", "dare-ties"):
            ours = skillhub_scores(registry, {t: ids[t] for t in tasks}, eval_sets, method)
            theirs = mergekit_scores(mergekit, result["paths"]["base"], {t: finetunes[t] for t in tasks}, eval_sets,
                                     method, scratch)
            cells = [f"{ours[t]:.2f} \\| {theirs[t]:.2f}" for t in tasks]
            mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
            print(f"| {method} | " + " | ".join(cells) + f" | {mean(ours):.3f} \\| {mean(theirs):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mergekit", default=str(Path(__file__).resolve().parent.parent / ".venv-mergekit" / "bin" /
                                                  "mergekit-yaml"), help="mergekit-yaml to compare with ('' to skip)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as scratch:
        result = run_demo(Path(scratch) / "demo", fast=args.fast, seed=args.seed, keep_finetunes=True)
        final, tasks = result["final"], result["tasks"]
        merges = ["fused", "task-arithmetic", "ties", "dare-linear", "dare-ties"]
        print(f"Tasks {', '.join(tasks)}; {result['train_steps']} steps; {result['test_examples']} held-out prompts "
              f"each; seed {args.seed}; held-out routing accuracy {result['routing']['accuracy']['heldout']:.4f}")
        print("| task | fine-tune | own set | routed | sum | task arithmetic | TIES | DARE-linear | DARE-TIES |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for task in tasks:
            row = [result["retention"][task]["fine-tune"], final["subset"][task], final["routed"][task],
                   *(final[m][task] for m in merges)]
            print(f"| {task} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
        means = {m: sum(final[m][t] for t in tasks) / len(tasks) for m in ("subset", "routed", *merges)}
        print("| mean | - | " + " | ".join(f"{means[m]:.3f}" for m in ("subset", "routed", *merges)) + " |")
        # The demo removed one pack at its end; the overhead is measured on the packs that remain.
        registry = Registry(result["paths"]["registry"])
        remaining = [t.name for t in registry.tasks() if t.packs]
        layer_sweep(registry, AutoConfig.from_pretrained(result["paths"]["base"]).num_hidden_layers)
        train_router(registry)  # back to the default layer
        ratio, labelled, routed = overhead(registry, remaining, args.repeats)
        print(f"\nRouting overhead, {len(remaining)} tasks x 16 prompts, 32-token answers: generate --route "
              f"{routed:.2f} s vs --task {labelled:.2f} s (medians of {args.repeats}): ratio {ratio:.3f} (goal <= 1.10)")
        if args.mergekit and Path(args.mergekit).exists():
            compare_with_mergekit(args.mergekit, result, Path(scratch))
        elif args.mergekit:
            print(f"\nmergekit not found at {args.mergekit}: run `make bench-venv` to compare with it")


if __name__ == "__main__":
    main()
