"""JSON Schemas shipped with skillhub (``schemas/`` in the repository, package data in a wheel)."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import jsonschema
from referencing import Registry, Resource

from skillhub.errors import SkillhubError

SCHEMA_NAMES = ("skillpack", "recipe", "lineage")


@functools.cache
def load_schema(name: str) -> dict[str, Any]:
    """Return the parsed JSON Schema ``<name>.schema.json``.

    Args:
        name: Schema name without suffix, e.g. ``"skillpack"``.

    Raises:
        SkillhubError: No schema of that name ships with this installation.
    """
    source = resources.files("skillhub._schemas").joinpath(f"{name}.schema.json")
    if not source.is_file():
        raise SkillhubError(f"no schema named {name!r}; known schemas: {', '.join(SCHEMA_NAMES)}")
    return json.loads(source.read_text(encoding="utf-8"))


@functools.cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    # Schemas refer to each other by file name (e.g. the manifest embeds the recipe schema).
    registry = Registry().with_resources(
        (f"{other}.schema.json", Resource.from_contents(load_schema(other))) for other in SCHEMA_NAMES
    )
    schema = load_schema(name)
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, registry=registry, format_checker=cls.FORMAT_CHECKER)


def validate(document: Any, name: str, *, error: type[SkillhubError], what: str) -> None:
    """Validate ``document`` against schema ``name``.

    Args:
        document: The parsed JSON document.
        name: Schema name, e.g. ``"recipe"``.
        error: The SkillhubError subclass to raise.
        what: How to call the document in the message, e.g. ``"recipe my.json"``.

    Raises:
        SkillhubError: (as ``error``) naming the first offending field and what is wrong with it.
    """
    problems = sorted(_validator(name).iter_errors(document), key=lambda e: list(e.absolute_path))
    if problems:
        first = problems[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(top level)"
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise error(f"{what} fails the {name} schema at {where}: {first.message}{more}")
