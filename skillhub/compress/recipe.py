"""Recipes: which operator, with which params, compresses each parameter of a model.

A recipe is a JSON document (``schemas/recipe.schema.json``): optional role overrides by
regex, then ordered rules matched by role and/or regex, first match wins. ``paper`` is
built in: the seed paper's Table 14 (GraftLLM, arXiv 2505.18502).

The ``router`` role (MoE routers) is newer than the first recipes: a recipe with no rule for it
compresses routers by its rule for ``other``, which every recipe written before had and which
stores tensors raw, rather than failing on MoE models or letting an ``mlp`` rule SVD them.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skillhub.errors import OperatorError, RecipeError
from skillhub.io.jsonio import read_json
from skillhub.operators import Operator, Split, get_operator, resolve_params
from skillhub.compress.roles import role_of
from skillhub.pack.schemas import validate

# Ranks in the paper are for 4096-wide models (Llama-3-8B); reference_dim scales them by
# min(rows, cols) / 4096 so the recipe keeps the same rank *fraction* on any model.
_MLP_SVD = {"groups": [[20, 8], [180, 3], [1200, 2]], "reference_dim": 4096}
PAPER_RECIPE: dict[str, Any] = {
    "name": "paper",
    "description": (
        "GraftLLM Table 14: embeddings and head magnitude-pruned (keep 0.5) at 4 bits; MLP SVD rank 1400 "
        "with 8/3/2 bits for ranks 20/180/1200; attention SVD rank 1000 with 8/2 bits for ranks 20/980; "
        "ranks given for 4096-wide matrices scale with min(rows, cols); fused projections (qkv_proj, gate_up_proj, "
        "c_attn) and stacked experts compressed matrix by matrix; the embedding a tied model shares with its head "
        "compressed like an MLP matrix (measured: pruning its dense delta costs 10-17x the logit error); MoE routers, "
        "norms, biases and the rest stored raw."
    ),
    "split_fused": True,
    "rules": [
        {"match": {"role": ["embedding", "head"], "tied": True}, "operator": "svd-mixed", "params": _MLP_SVD},
        {"match": {"role": ["embedding", "head"]}, "operator": "magnitude-prune", "params": {"keep": 0.5, "bits": 4}},
        {"match": {"role": "mlp"}, "operator": "svd-mixed", "params": _MLP_SVD},
        {"match": {"role": "attention"}, "operator": "svd-mixed",
         "params": {"groups": [[20, 8], [980, 2]], "reference_dim": 4096}},
        {"match": {"role": ["router", "norm", "bias", "other"]}, "operator": "raw", "params": {"dtype": "float16"}},
    ],
}
BUILTIN_RECIPES = {"paper": PAPER_RECIPE}
# Roles added after recipes were first written, and the role a recipe without a rule for them
# matches them as (see the module docstring).
_FALLBACK_ROLES: dict[str, tuple[str, ...]] = {"router": ("other",)}


def load_recipe(spec: str | os.PathLike[str] | dict[str, Any]) -> dict[str, Any]:
    """A recipe document from a built-in name, a JSON file, or a dict; validated against the schema.

    Raises:
        RecipeError: The file is missing or not JSON, or the document fails the schema.
    """
    if isinstance(spec, dict):
        document, what = copy.deepcopy(spec), "recipe"
    elif str(spec) in BUILTIN_RECIPES:
        document, what = copy.deepcopy(BUILTIN_RECIPES[str(spec)]), f"recipe {spec!r}"
    else:
        path = Path(spec)
        if not path.is_file():
            raise RecipeError(
                f"recipe {spec!r} is neither a built-in recipe ({', '.join(BUILTIN_RECIPES)}) nor a file"
            )
        what = f"recipe file {path}"
        document = read_json(path, what=what, error=RecipeError, expect=dict)
    validate(document, "recipe", error=RecipeError, what=what)
    return document


@dataclass(frozen=True)
class ModulePlan:
    """How one parameter will be compressed."""

    name: str
    role: str
    operator: Operator
    params: dict[str, Any]
    split: Split | None = None  # compressed as the matrices it is made of (skillhub.operators.parts)


class Recipe:
    """A validated recipe with its operators loaded and params checked.

    Every operator is resolved and every rule's params validated on construction,
    so a bad recipe fails before any tensor is read.
    """

    def __init__(self, spec: str | os.PathLike[str] | dict[str, Any]) -> None:
        self.document = load_recipe(spec)
        self.name: str = self.document["name"]
        self.split_fused: bool = self.document.get("split_fused", False)
        self._overrides = [(re.compile(o["pattern"]), o["role"]) for o in self.document.get("role_overrides", [])]
        self._rules: list[tuple[set[str] | None, re.Pattern[str] | None, bool | None, Operator, dict[str, Any]]] = []
        for number, rule in enumerate(self.document["rules"], start=1):
            where = f"recipe {self.name!r} rule {number}"
            try:
                operator = get_operator(rule["operator"])
            except OperatorError as exc:
                raise RecipeError(f"{where}: {exc}") from exc
            params = resolve_params(operator, rule.get("params"), where=where)
            roles = rule["match"].get("role")
            role_set = {roles} if isinstance(roles, str) else set(roles) if roles else None
            pattern = re.compile(rule["match"]["pattern"]) if "pattern" in rule["match"] else None
            self._rules.append((role_set, pattern, rule["match"].get("tied"), operator, params))

    def role(self, name: str, *, model_type: str | None, ndim: int) -> str:
        """The parameter's role after the recipe's overrides."""
        for pattern, role in self._overrides:
            if pattern.search(name):
                return role
        return role_of(name, model_type=model_type, ndim=ndim)

    def plan(self, name: str, *, model_type: str | None, ndim: int, tied: bool = False) -> ModulePlan:
        """The operator and params for parameter ``name`` (``tied``: it is the word embedding a tied
        model shares with its output head).

        Raises:
            RecipeError: No rule matches it.
        """
        role = self.role(name, model_type=model_type, ndim=ndim)
        for matched_as in (role, *_FALLBACK_ROLES.get(role, ())):
            for role_set, pattern, tied_rule, operator, params in self._rules:
                if (role_set is None or matched_as in role_set) and (pattern is None or pattern.search(name)) \
                        and tied_rule in (None, tied):
                    return ModulePlan(name=name, role=role, operator=operator, params=copy.deepcopy(params))
        raise RecipeError(
            f"no rule of recipe {self.name!r} matches {name} (role {role}); add a rule for that role or pattern"
        )
