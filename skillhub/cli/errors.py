"""From a skillhub error to the one line the user reads, with the next step to take.

Library errors state facts (what is missing, what conflicts); the command line knows its own
vocabulary (flags, other commands), so the next step is added here, from one ordered table:
the first row whose class matches (and whose test, if any, holds) adds its hint.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from skillhub.errors import (
    NotFoundError,
    OutputConflictError,
    OutputExistsError,
    ReadOnlyRegistryError,
    SkillhubError,
)

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# (error class, condition on the error or None, the hint to add); first match wins.
HINTS: list[tuple[type[SkillhubError], Callable[[SkillhubError], bool] | None, str]] = [
    (NotFoundError, lambda e: e.kind == "pack", "`skillhub list` shows the pack ids"),
    (NotFoundError, lambda e: e.kind == "base model" and e.name is None,
     "register one with `skillhub init --base BASE`, or `skillhub add` a pack first"),
    (NotFoundError, lambda e: e.kind == "base model", "`skillhub list` shows each pack's base; pass one with --base"),
    (NotFoundError, lambda e: e.kind == "task" and e.where == "with an eval set",
     "give it one with `skillhub task add TASK --eval FILE`"),
    (NotFoundError, lambda e: e.kind == "task", "`skillhub task list` shows the tasks"),
    (NotFoundError, lambda e: e.kind == "active pack to publish", "`skillhub add` packs, then push"),
    (OutputConflictError, None, ""),  # its message already says what to do
    (OutputExistsError, None, "choose another path or pass --force to replace it"),
    (ReadOnlyRegistryError, None, ""),
]


def plain(text: object) -> str:
    """``text`` as one line with no control characters: names and messages come from files and
    repos, and an escape sequence must never reach the terminal (nor a newline split a line)."""
    return _CONTROL.sub(lambda m: " " if m.group() in "\n\r\t" else "?", str(text))


def hint_for(exc: SkillhubError) -> str:
    """The next step for ``exc`` from :data:`HINTS` ('' if none)."""
    for kind, condition, hint in HINTS:
        if isinstance(exc, kind) and (condition is None or condition(exc)):
            return hint
    return ""


def error_line(exc: SkillhubError) -> str:
    """``Error: <message>[; <next step>]``, one line, safe for a terminal."""
    hint = hint_for(exc)
    return plain(f"Error: {exc}" + (f"; {hint}" if hint else ""))
