"""Training a router from a registry: routing examples, labels, and the classifier.

Examples: each task's routing examples (``route examples T FILE``) or, by default, the
prompts of its eval set; ``@base`` examples, and the examples of tasks whose activation set
is empty, teach the ``base`` class. Every example is assigned to the held-out split by a hash
of its prompt (1 in 5), so the split is stable across runs and machines; the router trains on
the rest.

Labels: ``task`` (the class of the example's task) or ``loss`` (the paper's, App. B.3: the
class under whose packs the example's answer has the lowest negative log-likelihood, the base
model included).

Classifier: scikit-learn's multinomial LogisticRegression over standardized features.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from skillhub.errors import NotFoundError, SkillhubError
from skillhub.progress import ProgressCallback, no_progress
from skillhub.registry.front import Registry
from skillhub.registry.routing import BASE_CLASS
from skillhub.routing.features import default_layer, prompt_features
from skillhub.routing.router import BASE, Router, RouteClass
from skillhub.scoring.datasets import collate, is_heldout, load_eval_set, load_prompts
from skillhub.scoring.prompts import PromptFormat, Renderer

LABELS = ("task", "loss")
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class RoutingExample:
    """A prompt (with its answer when known), the class it comes from, and its split."""

    prompt: str
    answer: str | None
    source: str  # the task whose examples it is, or "base"
    heldout: bool


def unseen_by_router(task: str, prompt: str, own_files: Collection[str]) -> bool:
    """Whether a router did not train on this eval-set example: a task with routing examples of
    its own (``own_files``) trained on those, any other on its eval set's non-held-out part."""
    return task in own_files or is_heldout(prompt)


def route_classes(registry: Registry, *, base: str | None = None) -> list[RouteClass]:
    """``base`` first, then every task with a non-empty activation set."""
    return [RouteClass(BASE, None, ())] + [RouteClass(t.name, t.name, tuple(t.packs))
                                           for t in registry.tasks(base=base) if t.packs]


def routing_examples(registry: Registry, classes: Sequence[RouteClass], *,
                     base: str | None = None) -> list[RoutingExample]:
    """Every routing example of the base's tasks (see the module docstring)."""
    given = {s.name: s.path for s in registry.routing_examples(base=base)}
    with_packs = {c.task for c in classes if c.task}
    examples = []
    sources: dict[str, list[dict[str, str]]] = {}
    for eval_set in registry.eval_sets(base=base):
        if eval_set.name not in given and eval_set.lm_eval is None:  # lm-eval's data is not ours to route on
            records = load_eval_set(eval_set.path, eval_set.metric)
            sources[eval_set.name] = [r if "prompt" in r else {"prompt": r["text"]} for r in records]
    for name, path in given.items():
        sources[name] = load_prompts(path)
    for name, records in sorted(sources.items()):
        label = name if name in with_packs else BASE  # @base, and tasks that no pack serves
        examples.extend(RoutingExample(r["prompt"], r.get("answer"), label, is_heldout(r["prompt"])) for r in records)
    return examples


@torch.no_grad()
def answer_losses(model, renderer: Renderer, examples: Sequence[RoutingExample], *,
                  batch_size: int = 32) -> torch.Tensor:
    """Mean negative log-likelihood of each example's answer (and its end) given its prompt."""
    losses = []
    for start in range(0, len(examples), batch_size):
        chunk = [{"prompt": e.prompt, "answer": e.answer or ""} for e in examples[start:start + batch_size]]
        batch = collate(renderer, chunk)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), targets, ignore_index=-100,
                                                reduction="none")
        losses.append(nll.sum(1) / (targets != -100).sum(1).clamp(min=1))
    return torch.cat(losses)


def loss_labels(registry: Registry, model, renderer: Renderer, classes: Sequence[RouteClass],
                examples: Sequence[RoutingExample], *, base: str | None = None,
                progress: ProgressCallback = no_progress) -> list[int]:
    """For each example, the class whose packs give its answer the lowest NLL (paper App. B.3)."""
    missing = next((e for e in examples if e.answer is None), None)
    if missing is not None:
        raise SkillhubError(f"--labels loss needs an answer for every routing example; {missing.prompt!r} "
                            f"({missing.source}) has none: add \"answer\" or use --labels task")
    table = []
    for number, route in enumerate(classes):
        with registry.activated(model, packs=list(route.packs), base=base, verify=False):
            table.append(answer_losses(model, renderer, examples))
        progress("label", number + 1, len(classes))
    return torch.stack(table, dim=1).argmin(dim=1).tolist()


def fit(features: torch.Tensor, labels: Sequence[int], classes: Sequence[RouteClass], *, seed: int = 0):
    """Fit the classifier; returns (coef, intercept, mean, scale) over all of ``classes``
    (a class with no example gets a logit of -inf: it is never chosen)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    present = sorted(set(labels))
    if len(present) < 2:
        only = classes[present[0]].name if present else "none"
        raise SkillhubError(f"routing needs examples of at least two classes, got only {only}: add a second task "
                            f"with a pack and an eval set, or base examples (`skillhub route examples {BASE_CLASS} FILE`)")
    x = features.double().numpy()
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(max_iter=2000, C=1.0, random_state=seed).fit(scaler.transform(x), list(labels))
    coef = torch.full((len(classes), x.shape[1]), 0.0, dtype=torch.float32)
    intercept = torch.full((len(classes),), float("-inf"), dtype=torch.float32)
    fitted_coef = torch.from_numpy(model.coef_).float()
    fitted_intercept = torch.from_numpy(model.intercept_).float()
    if len(present) == 2:  # binary: sklearn keeps one row w for class 1; softmax([-w/2, w/2]) is the same model
        fitted_coef = torch.cat([-fitted_coef / 2, fitted_coef / 2])
        fitted_intercept = torch.cat([-fitted_intercept / 2, fitted_intercept / 2])
    for row, label in enumerate(model.classes_.tolist()):
        coef[label], intercept[label] = fitted_coef[row], fitted_intercept[row]
    scale = torch.from_numpy(scaler.scale_).float()
    return coef, intercept, torch.from_numpy(scaler.mean_).float(), scale


@dataclass(frozen=True)
class TrainedRouter:
    """A router just trained and stored, with its lineage step."""

    router: Router
    step: int
    warnings: tuple[str, ...] = ()  # what the user should know about what it learned (one line each)


def train_router(registry: Registry, *, base: str | None = None, labels: str = "task", layer: int | None = None,
                 threshold: float = DEFAULT_THRESHOLD, base_location: str | None = None, seed: int = 0,
                 prompt_format: PromptFormat = PromptFormat(), loaded: tuple[Any, Any] | None = None,
                 progress: ProgressCallback = no_progress) -> TrainedRouter:
    """Train the base's router on its routing examples and store it in the registry.

    Args:
        registry: The registry.
        base: Registered base name (needed when there are several).
        labels: ``task`` or ``loss`` (see the module docstring).
        layer: Feature layer (default: half the decoder's depth).
        threshold: Below this probability for its best class, a prompt stays on the base model.
        base_location: Where the base weights are (default: recorded at add).
        seed: Seed of the classifier's solver.
        prompt_format: How prompts are rendered for features and routed answers (default: the base
            tokenizer's default).
        loaded: (model, tokenizer) of the base, already loaded and checked, to reuse.
        progress: Progress callback.

    Raises:
        SkillhubError: Bad parameters, no packs, too few classes, no answers for loss labels.
    """
    if labels not in LABELS:
        raise SkillhubError(f"unknown --labels {labels!r}: use one of {', '.join(LABELS)}")
    if not 0 <= threshold < 1:
        raise SkillhubError(f"--threshold must be in [0, 1), not {threshold}")
    registry.db.require_writable()
    classes = route_classes(registry, base=base)
    if len(classes) == 1:
        raise SkillhubError("no task has packs to route to: add packs first (`skillhub add PACK --task T`)")
    examples = routing_examples(registry, classes, base=base)
    if not examples:
        raise SkillhubError("no routing examples: give tasks eval sets (`skillhub task add T --eval FILE`) or "
                            "routing examples (`skillhub route examples T FILE`)")
    if loaded is None:
        model, tokenizer, base_entry = registry.load_base_model(base=base, location=base_location)
    else:
        (model, tokenizer), (base_entry, _) = loaded, registry.activation_set(packs=[], base=base)
    layer = default_layer(model) if layer is None else layer
    renderer = Renderer(tokenizer, prompt_format, what="the router's base")
    features = prompt_features(model, renderer, [e.prompt for e in examples], layer)
    index = {c.name: i for i, c in enumerate(classes)}
    if labels == "task":
        targets = [index[e.source] for e in examples]
    else:
        targets = loss_labels(registry, model, renderer, classes, examples, base=base, progress=progress)
    train = [i for i, e in enumerate(examples) if not e.heldout]
    heldout = [i for i, e in enumerate(examples) if e.heldout]
    coef, intercept, mean, scale = fit(features[train], [targets[i] for i in train], classes, seed=seed)
    router = Router(classes=list(classes), coef=coef, intercept=intercept, mean=mean, scale=scale, layer=layer,
                    threshold=threshold, labels=labels, base_fingerprint=base_entry.fingerprint,
                    known_packs=tuple(p.id for p in registry.list_packs(base=base)), prompt_format=prompt_format)

    def accuracy(rows: list[int]) -> float | None:
        if not rows:
            return None
        chosen = router.probabilities(features[rows]).argmax(dim=-1).tolist()
        return sum(c == targets[r] for c, r in zip(chosen, rows)) / len(rows)

    def confusion(rows: list[int]) -> list[list[int]]:
        counts = [[0] * len(classes) for _ in classes]
        if rows:
            for chosen, row in zip(router.probabilities(features[rows]).argmax(dim=-1).tolist(), rows):
                counts[targets[row]][chosen] += 1
        return counts

    router.info.update({
        "examples": {"train": len(train), "heldout": len(heldout),
                     "per_class": {c.name: sum(targets[i] == n for i in train) for n, c in enumerate(classes)}},
        "accuracy": {"train": accuracy(train), "heldout": accuracy(heldout)},
        "confusion": {"heldout": confusion(heldout)},  # [true class][chosen class] counts, in class order
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    spec, arrays = router.to_stored()
    step = registry.save_router(spec, arrays, base=base)
    warnings = ()
    if not any(targets[i] == index[BASE] for i in train):
        warnings = (f"no example taught the {BASE} class, so every prompt goes to some pack, general chat "
                    f"included: give prompts that belong to the base model (`skillhub route examples {BASE_CLASS} "
                    "FILE`) and train again",)
    return TrainedRouter(router=router, step=step, warnings=warnings)


def router_report(registry: Registry, *, base: str | None = None) -> dict[str, Any]:
    """The base's router as ``route show --json`` and the registry browser show it: its stored spec
    (classes, layer, training info with the held-out confusion matrix) and its staleness.

    Raises:
        NotFoundError: No router was trained for the base.
    """
    router = load_router(registry, base=base)
    active = [p.id for p in registry.list_packs(base=base)]
    stale = router.staleness(active, {t.name: list(t.packs) for t in registry.tasks(base=base)})
    spec, _ = router.to_stored()
    classes = [{**c, "usable": RouteClass(c["name"], c["task"], tuple(c["packs"])).usable(active)}
               for c in spec["classes"]]
    return {**spec, "classes": classes, "stale": stale, "is_stale": any(stale.values())}


def load_router(registry: Registry, *, base: str | None = None) -> Router:
    """The base's stored router.

    Raises:
        RegistryError: None was trained.
    """
    stored = registry.stored_router(base=base)
    if stored is None:
        raise NotFoundError("router", None, detail="for this base: train one with `skillhub route train`")
    router = Router.from_stored(stored.spec, stored.arrays)
    router.check_base(stored.fingerprint, stored.base)
    return router
