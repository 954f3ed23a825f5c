"""Forgetting, measured at every task addition: scores under each policy and the accuracy matrices.

After each addition, every task j with an eval set is scored under these policies, recorded
at that lineage step:

- ``subset``: its own activation set S_j (paper Eq. 10), the task label given;
- ``fused``: every active pack at once, summed (naive fusion, Eq. 9);
- ``routed``: each example routed without its task label by the base's router (Eq. 9,
  routed), when the base has one. A router made stale by the addition is first retrained
  with its recorded settings, so this measures the router ``route train`` would give. Only
  examples the router did not train on are scored: the held-out split of the eval set, or all
  of it when the task has routing examples of its own;
- a merge method (``ties`` by default): every active pack merged into one static model (with
  one pack, that pack as the merge sees it: TIES and DARE trim or drop part of it);
- ``base``: no pack.

The accuracy matrix R[k][j] of a policy holds task j's score at the step where the k-th task
got its pack; tasks are ordered by when they got their first pack. Perplexity tasks enter the
metrics as -perplexity, so that higher is better everywhere (and are not routed). Tasks scored by
lm-evaluation-harness (:mod:`skillhub.scoring.harness`) record ``lm-eval/<metric>``; its
perplexities enter negated too, and they are not routed either.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from skillhub.activation import MERGE_METHODS, Merge, Patcher
from skillhub.compress.options import CompressionOptions
from skillhub.errors import RegistryError, SkillhubError
from skillhub.scoring.metrics import DEFINITIONS, continual_metrics
from skillhub.progress import ProgressCallback, no_progress
from skillhub.registry.front import Registry
from skillhub.registry.results import DeclaredTask, EvalRecord, EvalSet, Scored
from skillhub.scoring.datasets import load_eval_set
from skillhub.scoring.harness import LOWER_IS_BETTER as LM_EVAL_LOWER_IS_BETTER
from skillhub.scoring.harness import HarnessTask, score_task
from skillhub.scoring.prompts import PromptFormat, Renderer
from skillhub.scoring.scores import score

if TYPE_CHECKING:
    from skillhub.pack.format import SkillPack
    from skillhub.sharing.peft_import import PeftSource

_log = logging.getLogger(__name__)
POLICIES = ("subset", "fused", "routed", *(m for m in MERGE_METHODS if m != "sum"))
LOWER_IS_BETTER = {"perplexity", *LM_EVAL_LOWER_IS_BETTER}  # metrics that enter R negated
DEFAULT_MERGE = Merge("ties")


def add_and_score(registry: Registry, pack: str | os.PathLike[str] | SkillPack | None = None, *,
                  from_models: tuple[str, str] | None = None, from_peft: PeftSource | None = None, task: str,
                  base: str | None = None,
                  new_base: bool = False, base_location: str | None = None,
                  compression: CompressionOptions = CompressionOptions(), eval_file: str | os.PathLike[str] | None = None,
                  metric: str = "exact_match", prompt_format: PromptFormat = PromptFormat(), evaluate: bool = True,
                  merge: Merge | None = DEFAULT_MERGE, progress: ProgressCallback = no_progress) -> Scored:
    """One step of continual learning: add a pack (or create it from a fine-tune first), give its
    task an eval set, and score every task with one (the forgetting measured at this addition).

    Args:
        registry: Where to add it.
        pack: A pack directory or an opened pack (or give ``from_models``).
        from_models: (BASE, TUNED): compress their delta with ``compression`` first.
        from_peft: A PEFT LoRA adapter for the registered base (or ``base_location``): made into a
            pack first, exactly, or with ``compression`` if the source says so.
        task: The task the pack teaches.
        base, new_base, base_location: As :meth:`Registry.add` (``base_location`` defaults to
            BASE with ``from_models``).
        eval_file, metric: The task's eval set, checked before anything is written.
        prompt_format: How the task's prompts are rendered (default: the base tokenizer's default).
        evaluate: Score every task with an eval set once the pack is in.
        merge: The merge scored as a policy of its own (None: none).
        progress: Progress callback.

    Returns:
        The pack's registry entry and, when evaluated, the scores recorded at its addition.
    """
    if sum(source is not None for source in (pack, from_models, from_peft)) != 1:
        raise SkillhubError("give one of a pack, from_models=(BASE, TUNED) or from_peft")
    if eval_file is not None:
        load_eval_set(eval_file, metric)  # a bad eval file stops the add before anything is written
    if from_peft is not None:
        from skillhub.sharing.peft_import import import_peft

        location = base_location or registry.activation_set(packs=[], base=base)[0].location
        with tempfile.TemporaryDirectory(prefix="skillhub-add-") as scratch:
            made = import_peft(from_peft.adapter, location, Path(scratch) / task, task=task,
                               adapter_revision=from_peft.revision, ignore_base_name=from_peft.ignore_base_name,
                               compression=compression if from_peft.compress else None, progress=progress)
            entry = registry.add(made, task=task, base=base, new_base=new_base, base_location=location)
    elif from_models is not None:
        from skillhub.compress.pipeline import create_pack

        with tempfile.TemporaryDirectory(prefix="skillhub-add-") as scratch:
            made = create_pack(*from_models, Path(scratch) / task, task=task, progress=progress,
                               **compression.as_kwargs())
            entry = registry.add(made, task=task, base=base, new_base=new_base,
                                 base_location=base_location or from_models[0])
    else:
        entry = registry.add(pack, task=task, base=base, new_base=new_base, base_location=base_location)
    if eval_file is not None:
        registry.add_task(task, eval_file, metric=metric, base=entry.base, prompt_format=prompt_format)
    scores = evaluate_tasks(registry, base=entry.base, step=entry.event, merge=merge, progress=progress) if evaluate else []
    return Scored(entry=entry, scores=tuple(scores))


def declare_task(registry: Registry, name: str, eval_file: str | os.PathLike[str] | None = None, *,
                 metric: str | None = None, lm_eval: HarnessTask | None = None, base: str | None = None,
                 base_location: str | None = None, prompt_format: PromptFormat = PromptFormat(),
                 evaluate: bool = True, loaded: tuple[Any, Any] | None = None) -> DeclaredTask:
    """Give task ``name`` an eval set and score the base model on it now.

    Declared before the task's pack (after ``init --base``, ideally before any pack), the task is
    then scored at every addition, so its column of R is complete, and its base score b_j is on
    record at this step, before anything was learned (FWT's reference).

    Args:
        registry: The registry (its base must be registered: ``init --base`` or a first pack).
        name, eval_file, metric, lm_eval, prompt_format: As :meth:`Registry.add_task`.
        base: Registered base name (needed when there are several).
        base_location: Where the base weights are (default: the location recorded).
        evaluate: Score the base model (False: only record the eval set).
        loaded: (model, tokenizer) of the base, already loaded and checked, to reuse.

    Returns:
        The task's eval set and, when evaluated, its ``base`` record filed under the task-add step.
    """
    task = registry.add_task(name, eval_file, metric=metric, lm_eval=lm_eval, base=base, prompt_format=prompt_format)
    if not evaluate:
        return DeclaredTask(task=task, scores=())
    model, tokenizer = loaded or registry.load_base_model(base=base, location=base_location)[:2]
    scorer = scorer_of(registry.eval_sets(base=base, task=name)[0])
    record = {"task": name, "policy": "base", "metric": task.metric, "score": scorer(model, tokenizer)}
    registry.record_scores([record], base=base, step=task.event)
    return DeclaredTask(task=task, scores=(record,))


def scorer_of(eval_set: EvalSet, examples: list[dict[str, str]] | None = None) -> Callable[[Any, Any], float]:
    """(model, tokenizer) -> the task's score: its eval file (``examples`` if already read) under
    its metric, or its lm-eval task, its prompts rendered in the task's format."""
    if eval_set.lm_eval is not None:
        return functools.partial(score_task, task=HarnessTask.from_json(eval_set.lm_eval),
                                 prompt_format=eval_set.prompt_format)
    if examples is None:
        examples = load_eval_set(eval_set.path, eval_set.metric)
    return lambda model, tokenizer: score(model, Renderer(tokenizer, eval_set.prompt_format,
                                                          what=f"the base of task {eval_set.name}"),
                                          examples, eval_set.metric)


def evaluate_tasks(registry: Registry, *, base: str | None = None, task: str | None = None,
                   base_location: str | None = None, step: int | None = None, merge: Merge | None = DEFAULT_MERGE,
                   progress: ProgressCallback = no_progress) -> list[dict[str, Any]]:
    """Score tasks under every policy (see the module docstring) and record the scores at ``step``.

    Args:
        registry: The registry.
        base: Registered base name (needed when there are several).
        task: Only this task (default: every task with an eval set).
        base_location: Where the base weights are (default: the location recorded at add).
        step: Lineage event to file the scores under (default: a new ``eval`` event).
        merge: The merge of every active pack scored as a policy of its own (None: none).
        progress: Called as ``progress("evaluate", done, total)``.

    Returns:
        The records written.
    """
    sets = registry.eval_sets(base=base, task=task)
    if not sets:
        return []
    examples = {s.name: load_eval_set(s.path, s.metric) for s in sets if s.lm_eval is None}  # read once
    scorers = {s.name: scorer_of(s, examples.get(s.name)) for s in sets}
    metrics = {s.name: s.metric for s in sets}
    active = [p.id for p in registry.list_packs(base=base)]
    tasks = {t.name: list(t.packs) for t in registry.tasks(base=base)}
    model, tokenizer, _ = registry.load_base_model(base=base, location=base_location)  # checked once; patching skips it
    router = _fresh_router(registry, active, tasks, base=base, loaded=(model, tokenizer), progress=progress)
    merged = merge is not None and not merge.is_plain_sum and bool(active)
    names = [s.name for s in sets]
    records = []
    total, done = (3 + merged) * len(sets) + (router is not None), 0

    def measure(policy: str, chosen: list[str], names: list[str], merge: Merge | None = None) -> None:
        nonlocal done
        with registry.activated(model, packs=chosen, base=base, verify=False, merge=merge):
            for name in names:
                records.append({"task": name, "policy": policy, "metric": metrics[name],
                                "score": scorers[name](model, tokenizer)})
                done += 1
                progress("evaluate", done, total)

    measure("base", [], names)
    measure("fused", active, names)
    for name in names:
        measure("subset", tasks.get(name, []), [name])
    if merged:
        measure(merge.method, active, names, merge=merge)
    if router is not None:
        records.extend(_routed_scores(registry, model, tokenizer, router, examples, metrics, active, base=base))
        progress("evaluate", total, total)
    registry.record_scores(records, base=base, step=step)
    return records


def _fresh_router(registry: Registry, active: list[str], tasks: dict[str, list[str]], *, base: str | None,
                  loaded: tuple[Any, Any], progress: ProgressCallback):
    """The base's router, retrained with its recorded settings if packs were added or sets changed
    since it was trained; None when the base has no router (or nothing left to route to)."""
    from skillhub.routing.router import Router
    from skillhub.routing.training import train_router

    stored = registry.stored_router(base=base)
    if stored is None or not active:
        return None
    router = Router.from_stored(stored.spec, stored.arrays)
    stale = router.staleness(active, tasks)
    if stale["added"] or stale["changed"] or not router.routes_to_packs(active):
        try:
            router = train_router(registry, base=base, labels=router.labels, layer=router.layer,
                                  threshold=router.threshold, prompt_format=router.prompt_format, loaded=loaded,
                                  progress=progress).router
        except SkillhubError as exc:  # e.g. too few classes left: score the other policies anyway
            _log.warning("routed policy not scored: the stale router could not be retrained: %s", exc)
            return None
    return router


def _routed_scores(registry: Registry, model, tokenizer, router, examples: dict[str, list[dict[str, str]]],
                   metrics: dict[str, str], active: list[str], *, base: str | None) -> list[dict[str, Any]]:
    """Exact match of each task's examples under the packs the router picks for each (examples the
    router trained on left out)."""
    from skillhub.routing.evaluation import hits_under
    from skillhub.routing.training import RoutingExample, unseen_by_router

    own_files = {s.name for s in registry.routing_examples(base=base)}
    chosen_examples = [RoutingExample(e["prompt"], e["answer"], name, heldout=True)
                       for name, records in examples.items() if metrics[name] == "exact_match"
                       for e in records if unseen_by_router(name, e["prompt"], own_files)]
    if not chosen_examples:
        return []
    decisions = router.route_prompts(model, tokenizer, [e.prompt for e in chosen_examples], active_packs=active)
    opened = registry.packs_by_id(sorted({p for d in decisions for p in d.packs}), base=base)
    patcher = Patcher(model)
    try:
        hits = hits_under(model, router.renderer(tokenizer), patcher, opened, chosen_examples,
                          [d.packs for d in decisions])
    finally:
        patcher.restore()
    records = []
    for name in dict.fromkeys(e.source for e in chosen_examples):
        rows = [i for i, e in enumerate(chosen_examples) if e.source == name]
        records.append({"task": name, "policy": "routed", "metric": "exact_match",
                        "score": sum(hits[i] for i in rows) / len(rows)})
    return records


def _higher_is_better(record: EvalRecord) -> float:
    return -record.score if record.metric in LOWER_IS_BETTER else record.score


def accuracy_matrices(registry: Registry, *, base: str | None = None) -> dict[str, Any]:
    """R for each policy, the base scores b, and ACC/BWT/FWT/forgetting with their definitions.

    Raises:
        RegistryError: No task has been evaluated at its addition yet.
    """
    records = registry.scores(base=base)
    steps: list[tuple[int, str]] = []  # (step, task learned there), first pack of each task
    for record in records:
        if record.event == "add" and record.event_task not in [t for _, t in steps]:
            steps.append((record.step, record.event_task))
    evaluated = {r.task for r in records}
    order = [t for _, t in steps if t in evaluated]
    steps = [(s, t) for s, t in steps if t in evaluated]
    if not order:
        raise RegistryError("no task has been scored at its addition yet: give tasks eval sets "
                            "(`skillhub task add T --eval FILE`) and add their packs without --no-eval")
    table = {(r.step, r.task, r.policy): r for r in records}

    def cell(step: int, task: str, policy: str) -> EvalRecord | None:
        return table.get((step, task, policy))

    result: dict[str, Any] = {"tasks": order, "definitions": DEFINITIONS, "policies": {}}
    learned_at = {task: step for step, task in steps}
    # b_j: the base's score at the step task j was learned, else its score when it was declared (step 0).
    declared = {r.task: r for r in records if r.policy == "base" and r.event == "task-add"}  # the latest eval set
    base_records = [cell(learned_at[task], task, "base") or declared.get(task) for task in order]
    result["base"] = [r.score if r else None for r in base_records]
    recorded = {r.policy for r in records}
    for policy in (p for p in POLICIES if p in recorded):
        cells = [[cell(step, task, policy) for task in order] for step, _ in steps]
        matrix = [[c.score if c else None for c in row] for row in cells]
        complete = all(c is not None for row in cells for c in row) and all(base_records)
        metrics = None
        if complete:
            metrics = continual_metrics([[_higher_is_better(c) for c in row] for row in cells],
                                        [_higher_is_better(r) for r in base_records])
        # A task given its eval set after earlier additions has no score at those steps.
        result["policies"][policy] = {"R": matrix, "metrics": metrics, "complete": complete}
    return result


def plot_matrices(result: dict[str, Any], path: str) -> None:
    """Heatmaps of R for each policy, side by side, as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RegistryError("--plot needs matplotlib: pip install 'skillhub[plot]'") from exc
    tasks = result["tasks"]
    policies = list(result["policies"])  # the demo adds sequential fine-tuning to the registry's two
    figure, axes = plt.subplots(1, len(policies), figsize=(4.5 * len(policies), 4), squeeze=False)
    for axis, policy in zip(axes[0], policies):
        matrix = torch.tensor([[float("nan") if v is None else v for v in row] for row in result["policies"][policy]["R"]])
        top = max(1.0, float(matrix.nan_to_num(0).max()))
        image = axis.imshow(matrix.numpy(), vmin=0, vmax=top, cmap="viridis")
        axis.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
        axis.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks])
        axis.set_title(f"R[k][j], {policy}")
        for k in range(len(tasks)):
            for j in range(len(tasks)):
                value = float(matrix[k, j])
                axis.text(j, k, f"{value:.2f}", ha="center", va="center", fontsize=8,
                          color="black" if value > 0.6 * top else "white")
        figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
