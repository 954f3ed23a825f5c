"""``route eval``: how well the router picks packs, and what that costs in task score.

On examples the router did not train on (by default: each task's eval set, only its held-out
split when the router trained on those prompts, plus held-out ``@base`` examples; or files
given with ``--eval`` holding ``{"prompt", "answer", "task"}``), it reports per task:

- routing accuracy: the router chose the example's class (its task, or ``base`` for a task
  without packs or ``@base``/``base`` examples);
- the routed score (exact match under the packs the router chose), against the score under
  the task's own activation set (the oracle: the task label given) and the base model's;

plus the confusion matrix, and the same for the training-free spectral router side by side.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from skillhub.activation import Patcher
from skillhub.errors import SkillhubError
from skillhub.pack.format import SkillPack
from skillhub.progress import ProgressCallback, no_progress
from skillhub.registry.front import Registry
from skillhub.registry.results import Result
from skillhub.registry.routing import BASE_CLASS
from skillhub.routing.router import BASE, Decision
from skillhub.routing.spectral import SpectralRouter
from skillhub.routing.training import RoutingExample, load_router, route_classes, unseen_by_router
from skillhub.scoring.datasets import is_heldout, load_eval_set, load_prompts
from skillhub.scoring.prompts import Renderer
from skillhub.scoring.scores import exact_match_each


@dataclass(frozen=True)
class TaskRouting(Result):
    """One task's (or the base class's) line of the report."""

    task: str
    examples: int
    accuracy: float
    routed: float | None  # exact match with the packs the router chose (None: no answers to score)
    own_set: float | None  # with the task's own activation set
    base: float | None  # with no pack
    spectral_accuracy: float
    spectral_routed: float | None


@dataclass(frozen=True)
class RouteReport(Result):
    """The whole report: per task lines, overall accuracies and the confusion matrices
    (rows: true class, columns: chosen class, both in ``classes`` order)."""

    classes: tuple[str, ...]
    tasks: tuple[TaskRouting, ...]
    accuracy: float
    spectral_accuracy: float
    confusion: tuple[tuple[int, ...], ...]
    spectral_confusion: tuple[tuple[int, ...], ...]
    stale: dict[str, list[str]]


def evaluation_examples(registry: Registry, *, base: str | None = None,
                        eval_files: Sequence[str | os.PathLike[str]] = ()) -> list[RoutingExample]:
    """The examples ``route eval`` scores (see the module docstring)."""
    with_packs = {c.task for c in route_classes(registry, base=base) if c.task}

    def label(task: str) -> str:
        return task if task in with_packs else BASE

    if eval_files:
        known = {t.name for t in registry.tasks(base=base)} | {BASE, BASE_CLASS}
        examples = []
        for path in eval_files:
            for record in load_prompts(path, with_task=True):
                if record["task"] not in known:
                    raise SkillhubError(f"{path}: task {record['task']!r} is not a task of this base (known: "
                                        f"{', '.join(sorted(known))}); use \"base\" for prompts no pack should take")
                examples.append(RoutingExample(record["prompt"], record.get("answer"), label(record["task"]),
                                               heldout=True))
        return examples
    given = {s.name: s.path for s in registry.routing_examples(base=base)}
    examples = []
    for eval_set in registry.eval_sets(base=base):
        if eval_set.metric != "exact_match":
            continue  # routing is scored by exact match; perplexity sets have no answers to check
        examples.extend(RoutingExample(r["prompt"], r["answer"], label(eval_set.name), heldout=True)
                        for r in load_eval_set(eval_set.path, eval_set.metric)
                        if unseen_by_router(eval_set.name, r["prompt"], given))
    if BASE_CLASS in given:
        examples.extend(RoutingExample(r["prompt"], r.get("answer"), BASE, heldout=True)
                        for r in load_prompts(given[BASE_CLASS]) if is_heldout(r["prompt"]))
    return examples


def evaluate_router(registry: Registry, *, base: str | None = None, eval_files: Sequence[str | os.PathLike[str]] = (),
                    base_location: str | None = None, allow_stale: bool = False,
                    progress: ProgressCallback = no_progress) -> RouteReport:
    """Score the base's router (and the spectral one) on held-out examples; see the module docstring.

    Raises:
        SkillhubError: No router, a stale one, no examples to evaluate.
    """
    router = load_router(registry, base=base)
    active = [p.id for p in registry.list_packs(base=base)]
    task_sets = {t.name: list(t.packs) for t in registry.tasks(base=base)}
    stale = router.check_usable(active, task_sets, allow_stale=allow_stale)
    examples = evaluation_examples(registry, base=base, eval_files=eval_files)
    if not examples:
        raise SkillhubError("no examples to evaluate the router on: give tasks eval sets or pass --eval FILE")
    model, tokenizer, _ = registry.load_base_model(base=base, location=base_location)
    classes = [c for c in router.classes if c.usable(active)]
    names = [c.name for c in classes]
    unknown = sorted({e.source for e in examples} - set(names))
    if unknown:
        raise SkillhubError(f"examples of {', '.join(unknown)}, which the router has no class for: "
                            "retrain it with `skillhub route train`")
    prompts = [e.prompt for e in examples]
    decisions = router.route_prompts(model, tokenizer, prompts, active_packs=active)
    opened = registry.packs_by_id(sorted({p for c in classes for p in c.packs}), base=base)
    renderer = router.renderer(tokenizer)  # every answer here is read as routed generation reads it
    spectral = SpectralRouter(model, classes, opened).decide(renderer, prompts)
    patcher = Patcher(model)
    by_class = {c.name: c.packs for c in classes}

    def hits(chosen: Sequence[tuple[str, ...]]) -> dict[int, bool]:
        return hits_under(model, renderer, patcher, opened, examples, chosen)

    try:
        routed = hits([d.packs for d in decisions])
        progress("route-eval", 1, 4)
        spectral_routed = hits([d.packs for d in spectral])
        progress("route-eval", 2, 4)
        own = hits([by_class[e.source] for e in examples])
        progress("route-eval", 3, 4)
        plain = hits([() for _ in examples])
        progress("route-eval", 4, 4)
    finally:
        patcher.restore()
    return _report(names, examples, decisions, spectral, routed, spectral_routed, own, plain, stale)


def hits_under(model, renderer: Renderer, patcher: Patcher, opened: dict[str, SkillPack], examples: Sequence[RoutingExample],
               chosen: Sequence[tuple[str, ...]]) -> dict[int, bool]:
    """Exact match of each example that has an answer, under the pack set chosen for it
    (examples grouped by set, each set patched once); keyed by the example's index."""
    result: dict[int, bool] = {}
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, example in enumerate(examples):
        if example.answer is not None:
            groups.setdefault(tuple(chosen[i]), []).append(i)
    for packs, members in groups.items():
        patcher.use([opened[p] for p in packs])
        batch = [{"prompt": examples[i].prompt, "answer": examples[i].answer} for i in members]
        result.update(zip(members, exact_match_each(model, renderer, batch)))
    return result


def _chosen(decision: Decision) -> str:
    return decision.task if decision.task is not None and decision.packs else BASE


def _report(names: list[str], examples: list[RoutingExample], decisions: list[Decision], spectral: list[Decision],
            routed: dict[int, bool], spectral_routed: dict[int, bool], own: dict[int, bool], plain: dict[int, bool],
            stale: dict[str, list[str]]) -> RouteReport:
    def mean(values: dict[int, bool], rows: list[int]) -> float | None:
        rows = [r for r in rows if r in values]
        return sum(values[r] for r in rows) / len(rows) if rows else None

    def confusion(chosen: list[Decision]) -> tuple[tuple[int, ...], ...]:
        matrix = [[0] * len(names) for _ in names]
        for example, decision in zip(examples, chosen):
            matrix[names.index(example.source)][names.index(_chosen(decision))] += 1
        return tuple(tuple(row) for row in matrix)

    right = [_chosen(d) == e.source for d, e in zip(decisions, examples)]
    spectral_right = [_chosen(d) == e.source for d, e in zip(spectral, examples)]
    lines = []
    for name in names:
        rows = [i for i, e in enumerate(examples) if e.source == name]
        if rows:
            lines.append(TaskRouting(task=name, examples=len(rows), accuracy=sum(right[i] for i in rows) / len(rows),
                                     routed=mean(routed, rows), own_set=mean(own, rows), base=mean(plain, rows),
                                     spectral_accuracy=sum(spectral_right[i] for i in rows) / len(rows),
                                     spectral_routed=mean(spectral_routed, rows)))
    return RouteReport(classes=tuple(names), tasks=tuple(lines), accuracy=sum(right) / len(right),
                       spectral_accuracy=sum(spectral_right) / len(spectral_right), confusion=confusion(decisions),
                       spectral_confusion=confusion(spectral), stale=stale)
