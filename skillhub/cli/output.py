"""Rendering for the command line: consoles, tables, progress bars and JSON.

rich is imported where a table or bar is drawn: ``--json`` listings should not pay for it.
Every string that came from a file, a repo or the registry goes through :func:`markup_safe`
before rich renders it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from skillhub.cli.errors import plain
from skillhub.progress import ProgressCallback


def markup_safe(text: object) -> str:
    """:func:`plain`, with rich markup escaped (a name like ``[/bold]`` is text, not a tag)."""
    from rich.markup import escape

    return escape(plain(text))


def stderr():
    from rich.console import Console

    return Console(stderr=True)


def stdout():
    from rich.console import Console

    # Piped or captured output has no terminal width; rich would then squeeze tables to 80 columns.
    console = Console()
    return console if console.is_terminal else Console(width=200)


def new_table(**options):
    from rich.table import Table

    return Table(**options)


@contextmanager
def progress_bar(enabled: bool) -> Iterator[ProgressCallback]:
    """A rich progress bar on stderr, fed by the library's progress callback.

    Only on a terminal: piped or captured stderr gets no bar (and no stray newline before an
    ``Error:`` line).
    """
    console = stderr()
    if not enabled or not console.is_terminal:
        yield lambda description, completed, total: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    # Each stage (calibrate, plan, compress...) its own bar, with the time spent and an estimate of the rest.
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(description: str, completed: int, total: int) -> None:
            if description not in tasks:
                tasks[description] = bar.add_task(description, total=total)
            bar.update(tasks[description], completed=completed, total=total)

        yield update


def wants_json(ctx: click.Context, local: bool) -> bool:
    return local or bool(ctx.find_root().params.get("as_json"))


def emit_json(document: Any) -> None:
    # Indented for a person at a terminal; compact when piped, where json's C encoder applies
    # (indentation forces the pure-Python one: 0.3 s for a 10,000-pack listing).
    import sys

    from skillhub.registry.results import as_json

    indent = 2 if sys.stdout.isatty() else None
    click.echo(json.dumps(as_json(document), indent=indent))


def print_table(columns: list[str], rows: list[list[str]], title: str | None = None) -> None:
    grid = new_table(title=markup_safe(title) if title else None, show_edge=False)
    for column in columns:
        grid.add_column(column)
    for row in rows:
        grid.add_row(*(markup_safe(cell) for cell in row))  # names and paths come from the registry
    stdout().print(grid)


def print_scores(records: list[dict[str, Any]]) -> None:
    by_task: dict[str, dict[str, float]] = {}
    for record in records:
        by_task.setdefault(record["task"], {})[record["policy"]] = record["score"]
    print_table(["task", "own set (Eq. 10)", "all packs fused", "base"],
                 [[t, *(f"{s[p]:.3f}" if p in s else "-" for p in ("subset", "fused", "base"))]
                  for t, s in by_task.items()])


def format_forgetting(result: dict[str, Any]) -> str:
    """The accuracy matrices and metrics as Markdown (policies side by side, definitions below)."""
    tasks = result["tasks"]
    labels = {"subset": "skillhub, each task's own activation set (Eq. 10)",
              "fused": "skillhub, all packs summed (Eq. 9)",
              "routed": "skillhub, routed without the task label (Eq. 9, routed)",
              "sequential fine-tuning": "sequential fine-tuning"}  # the demo's baseline
    policies = {labels.get(name, f"skillhub, all packs merged by {name}"): data
                for name, data in result["policies"].items()}
    lines = ["R[k][j]: score on task j (columns) after learning task k (rows); base b = "
             + ", ".join(f"{t} {'-' if b is None else f'{b:.2f}'}" for t, b in zip(tasks, result["base"])), ""]
    for label, data in policies.items():
        lines.append(f"{label}:")
        lines.append("| after \\ task | " + " | ".join(tasks) + " |")
        lines.append("|---|" + "---:|" * len(tasks))
        for task, row in zip(tasks, data["R"]):
            lines.append(f"| {task} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in row) + " |")
        lines.append("")
    names = ["ACC", "BWT", "FWT", "forgetting"]
    lines.append("| policy | " + " | ".join(names) + " |")
    lines.append("|---|" + "---:|" * len(names))
    for label, data in policies.items():
        if data["metrics"] is None:
            lines.append(f"| {label} | " + " | ".join("-" for _ in names) + " |")
            continue
        values = [data["metrics"][n] for n in names]
        lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:+.3f}" for v in values) + " |")
    lines.append("")
    lines.extend(f"- {name}: {definition}" for name, definition in result["definitions"].items())
    return "\n".join(lines)


def warn_if_conflicting(packs: list) -> None:
    """One line on stderr when several packs about to be summed interfere (see ``skillhub interference``)."""
    if len(packs) < 2:
        return
    from skillhub.scoring.interference import interference

    report = interference(packs)
    if report.verdict == "conflicting":
        click.echo(plain(f"Warning: packs {', '.join(report.packs)} are conflicting ({report.explanation}); "
                         "see `skillhub interference`"), err=True)
