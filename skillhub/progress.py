"""How long-running library calls report progress without printing (the CLI renders it)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar
from contextlib import contextmanager

# progress(description, completed, total): called after each unit of work.
ProgressCallback = Callable[[str, int, int], None]


def no_progress(description: str, completed: int, total: int) -> None:
    """The default callback: report nothing."""


Item = TypeVar("Item")


def reporting(items: Iterable[Item], progress: ProgressCallback, description: str, total: int) -> Iterator[Item]:
    """Yield ``items`` unchanged, calling ``progress(description, n, total)`` after each."""
    for done, item in enumerate(items, start=1):
        yield item
        del item  # the consumer may free it (a 14336 x 4096 delta) before the next is made
        progress(description, done, total)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' own tqdm bars (library code never prints), restoring the setting after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
