"""How long-running library calls report progress without printing (the CLI renders it)."""

from __future__ import annotations

from collections.abc import Callable

# progress(description, completed, total): called after each unit of work.
ProgressCallback = Callable[[str, int, int], None]


def no_progress(description: str, completed: int, total: int) -> None:
    """The default callback: report nothing."""
