"""A trained router (paper Eq. 9, App. B.3): which packs answer a prompt, from the base model's
features of it, with a ``base`` class for prompts no pack should take.

The classifier is a multinomial logistic regression over standardized features (trained by
:mod:`skillhub.routing.training` with scikit-learn); here it is only arrays, applied with
torch: p = softmax(W (x - mean) / scale + b). It is stored in the registry as a JSON spec plus
those arrays as safetensors bytes, never as a pickle.

A router knows the packs that were active when it was trained. When one of them is removed,
every class that uses it is dropped at once (its probability is zero, the rest renormalized),
so a removed pack is never routed to, even before retraining. A pack added since makes the
router stale: it would never route to the new pack, so routing refuses until ``route train``.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_arrays
from safetensors.torch import save as save_arrays

from skillhub.errors import RegistryError, SkillhubError
from skillhub.routing.features import prompt_features
from skillhub.scoring.prompts import PromptFormat, Renderer

FORMAT = 1
BASE = "base"  # the class that answers with the base model alone


@dataclass(frozen=True)
class RouteClass:
    """One outcome of routing: a task's activation set (or the base model, with no packs)."""

    name: str
    task: str | None
    packs: tuple[str, ...]

    def usable(self, active_packs: Collection[str]) -> bool:
        """Whether every pack of the class is still active (the base class always is)."""
        return set(self.packs) <= set(active_packs)


@dataclass(frozen=True)
class Decision:
    """Where one prompt goes: the class, its packs, and the router's probability for it."""

    task: str | None
    packs: tuple[str, ...]
    probability: float | None  # None when the packs were named, not routed
    abstained: bool = False  # the best class was below the threshold, so the base answers


@dataclass
class Router:
    """A router's arrays and spec (see the module docstring).

    Args:
        classes: The outcomes, in the order of the rows of ``coef``.
        coef: The classifier's weights (C x H).
        intercept: Its biases (C).
        mean: The features' mean (H), subtracted first.
        scale: Their scale (H), divided by next.
        layer: The base model's layer the features come from.
        threshold: Below this probability for the best class, the base model answers.
        labels: How the training examples were labelled: ``task`` or ``loss``.
        base_fingerprint: The base weights the features belong to.
        known_packs: The packs that were active when it was trained.
        prompt_format: How prompts are rendered for its features (and for the answers of routed
            generation): a prompt has no task yet, so one format serves every class.
        info: Everything else worth keeping (example counts, training accuracy, time).
    """

    classes: list[RouteClass]
    coef: torch.Tensor
    intercept: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor
    layer: int
    threshold: float
    labels: str
    base_fingerprint: str
    known_packs: tuple[str, ...]
    prompt_format: PromptFormat = PromptFormat()
    info: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ use

    def probabilities(self, features: torch.Tensor, *, active_packs: Sequence[str] | None = None) -> torch.Tensor:
        """(N, C) class probabilities; with ``active_packs``, classes using a pack no longer
        active get probability zero (the others renormalized)."""
        x = (features.to(torch.float32) - self.mean) / self.scale
        logits = x @ self.coef.T + self.intercept
        if active_packs is not None:
            dropped = torch.tensor([not c.usable(active_packs) for c in self.classes])
            logits = logits.masked_fill(dropped, float("-inf"))
        return torch.softmax(logits, dim=-1)

    def decide(self, features: torch.Tensor, *, active_packs: Sequence[str] | None = None) -> list[Decision]:
        """The decision for each row of ``features``."""
        probabilities = self.probabilities(features, active_packs=active_packs)
        best, index = probabilities.max(dim=-1)
        decisions = []
        for p, i in zip(best.tolist(), index.tolist()):
            chosen = self.classes[i]
            if p < self.threshold and chosen.packs:
                decisions.append(Decision(task=None, packs=(), probability=p, abstained=True))
            else:
                decisions.append(Decision(task=chosen.task, packs=chosen.packs, probability=p))
        return decisions

    def renderer(self, tokenizer) -> Renderer:
        """The router's prompt format bound to the base's tokenizer."""
        return Renderer(tokenizer, self.prompt_format, what="the router's base")

    def route_prompts(self, model: torch.nn.Module, tokenizer, prompts: Sequence[str], *,
                      active_packs: Sequence[str]) -> list[Decision]:
        """Features of the prompts from ``model`` (which must hold the base weights), then :meth:`decide`."""
        features = prompt_features(model, self.renderer(tokenizer), list(prompts), self.layer)
        return self.decide(features, active_packs=active_packs)

    # ------------------------------------------------------------------ lifecycle

    def routes_to_packs(self, active_packs: Collection[str]) -> bool:
        """Whether some class with packs is still usable (else every prompt would go to the base)."""
        return any(c.packs and c.usable(active_packs) for c in self.classes)

    def staleness(self, active_packs: Sequence[str], task_sets: dict[str, Sequence[str]]) -> dict[str, list[str]]:
        """What changed in the lineage since training: packs ``added`` (the router cannot route to
        them), packs ``removed`` (their classes are dropped), tasks whose set ``changed``."""
        known = set(self.known_packs)
        removed = sorted(known - set(active_packs))
        changed = sorted(c.task for c in self.classes if c.task is not None and c.task in task_sets
                         and set(task_sets[c.task]) != set(c.packs) and c.usable(active_packs))
        return {"added": [p for p in active_packs if p not in known], "removed": removed, "changed": changed}

    def check_usable(self, active_packs: Sequence[str], task_sets: dict[str, Sequence[str]], *,
                     allow_stale: bool = False) -> dict[str, list[str]]:
        """Raises RegistryError if the router cannot route the current lineage; returns its staleness.

        Removed packs are fine (their classes are dropped exactly). Added packs or changed
        activation sets are not, unless ``allow_stale``.
        """
        stale = self.staleness(active_packs, task_sets)
        if not allow_stale and (stale["added"] or stale["changed"]):
            what = (f"pack(s) {', '.join(stale['added'])} were added" if stale["added"]
                    else f"the activation set of {', '.join(stale['changed'])} changed")
            raise RegistryError(f"the router is stale: {what} since it was trained; retrain it with "
                                "`skillhub route train` (or pass --allow-stale to route among the classes it knows)")
        if not self.routes_to_packs(active_packs):
            raise RegistryError("every class of the router uses a removed pack: retrain it with `skillhub route train`")
        return stale

    # ------------------------------------------------------------------ storage

    def to_stored(self) -> tuple[dict[str, Any], bytes]:
        """The JSON spec and the safetensors bytes the registry keeps."""
        spec = {
            "format": FORMAT,
            "labels": self.labels,
            "layer": self.layer,
            "threshold": self.threshold,
            "feature": {"kind": "mean-pooled hidden state of the rendered prompt", "layer": self.layer,
                        "size": int(self.coef.shape[1])},
            "prompt_format": self.prompt_format.as_json(),
            "base_fingerprint": self.base_fingerprint,
            "classes": [{"name": c.name, "task": c.task, "packs": list(c.packs)} for c in self.classes],
            "known_packs": list(self.known_packs),
            "info": self.info,
        }
        arrays = save_arrays({"coef": self.coef.contiguous(), "intercept": self.intercept.contiguous(),
                              "mean": self.mean.contiguous(), "scale": self.scale.contiguous()},
                             metadata={"skillhub_router": json.dumps({"format": FORMAT})})
        return spec, arrays

    @classmethod
    def from_stored(cls, spec: dict[str, Any], arrays: bytes) -> Router:
        """Rebuild a router from its stored form.

        Raises:
            RegistryError: The stored router is of an unknown format or inconsistent.
        """
        if spec.get("format") != FORMAT:
            raise RegistryError(f"the stored router has format {spec.get('format')!r}; this skillhub reads format "
                                f"{FORMAT}: retrain it with `skillhub route train`")
        try:
            tensors = load_arrays(arrays)
            classes = [RouteClass(c["name"], c["task"], tuple(c["packs"])) for c in spec["classes"]]
            router = cls(classes=classes, coef=tensors["coef"], intercept=tensors["intercept"], mean=tensors["mean"],
                         scale=tensors["scale"], layer=int(spec["layer"]), threshold=float(spec["threshold"]),
                         labels=spec["labels"], base_fingerprint=spec["base_fingerprint"],
                         known_packs=tuple(spec["known_packs"]), info=dict(spec.get("info", {})),
                         # routers stored before prompt formats read ``<s> prompt``: the plain format
                         prompt_format=PromptFormat.from_json(spec.get("prompt_format", {"format": "plain"})))
        except (KeyError, TypeError, ValueError, SkillhubError) as exc:
            raise RegistryError(f"the stored router is damaged ({exc}): retrain it with `skillhub route train`") from exc
        size = router.coef.shape[1] if router.coef.dim() == 2 else -1
        if (router.coef.shape[0] != len(classes) or router.intercept.shape != (len(classes),)
                or router.mean.shape != (size,) or router.scale.shape != (size,)):
            raise RegistryError("the stored router's arrays do not match its classes: retrain it with "
                                "`skillhub route train`")
        return router

    def check_base(self, fingerprint: str, name: str) -> None:
        """Raises SkillhubError if the router was trained on another base model's features."""
        if fingerprint != self.base_fingerprint:
            raise SkillhubError(f"the router was trained for base weights {self.base_fingerprint[:16]}..., not {name} "
                                f"({fingerprint[:16]}...): retrain it with `skillhub route train --base {name}`")
