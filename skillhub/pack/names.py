"""The one rule for names: packs, tasks and base models, wherever they come from.

Names travel into terminals, file names, SQL rows and Hub repos, so they are a plain
alphabet with a length limit. Pack and task names follow the manifest schema's
``identifier``; base model names may also hold ``/`` (Hub ids such as ``org/model``).
"""

from __future__ import annotations

import re

from skillhub.errors import InvalidNameError

IDENTIFIER = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"  # schemas/skillpack.schema.json $defs/identifier
BASE_NAME = r"[A-Za-z0-9][A-Za-z0-9._/-]{0,255}"
_PATTERNS = {"pack": IDENTIFIER, "task": IDENTIFIER, "base": BASE_NAME}


def check_name(value: object, kind: str) -> str:
    """Return ``value`` if it is a valid ``kind`` name (``pack``, ``task`` or ``base``).

    Raises:
        SkillhubError: Naming the kind, the (shortened, escaped) value and the allowed form.
    """
    pattern = _PATTERNS[kind]
    if isinstance(value, str) and re.fullmatch(pattern, value) and ".." not in value.split("/"):
        return value
    shown = repr(value)[:60] + ("..." if len(repr(value)) > 60 else "")
    limit = 256 if kind == "base" else 128
    extra = ", '/'" if kind == "base" else ""
    raise InvalidNameError(
        f"{kind} name {shown} is not allowed: use letters, digits, '.', '_', '-'{extra} (at most {limit}), "
        "starting with a letter or digit"
    )


def base_name_from(identifier: str) -> str:
    """A valid base name derived from a recorded base id (a Hub id or a directory name)."""
    cleaned = re.sub(r"[^A-Za-z0-9._/-]+", "-", identifier)
    cleaned = re.sub(r"^[^A-Za-z0-9]+", "", cleaned)[:256].rstrip("/")
    return cleaned if cleaned and re.fullmatch(BASE_NAME, cleaned) else "base"
