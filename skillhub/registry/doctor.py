"""Checking the registry against its store, and removing what interrupted work left.

Problems (the registry is inconsistent): a pack row whose files are missing, or whose files
fail their sha256. Leftovers (harmless, removed by ``repair``): stored packs no row refers
to, incoming directories of interrupted pulls and adds, and the temporary directories of
outputs (``create``, ``apply``, ``activate``, ``pull -o``) whose process was killed. Only what
provably is skillhub's is ever removed (see :mod:`skillhub.registry.store` and
:mod:`skillhub.io.outputs`); ``repaired`` lists exactly what was deleted, ``kept`` what was
found but left alone, and why.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import select

from skillhub.errors import PackError
from skillhub.io.outputs import interrupted_writes, remove_interrupted
from skillhub.registry.database import Database
from skillhub.registry.results import DoctorReport
from skillhub.registry.store import PackStore
from skillhub.registry.tables import PackRow


def doctor(db: Database, store: PackStore, *, repair: bool) -> DoctorReport:
    """See the module docstring."""
    if repair:
        db.require_writable()
    with db.session() as session:
        rows = list(session.scalars(select(PackRow)))
    problems, checked = [], 0
    for row in rows:
        if row.purged:
            continue
        checked += 1
        try:
            if store.open(row.sha256).manifest.tensors_sha256 != row.sha256:
                raise PackError("stored under the wrong address")
        except PackError as exc:
            problems.append({"pack": row.id, "problem": str(exc)})
    referenced = {row.sha256 for row in rows if not row.purged}
    orphans = sorted(set(store.addresses()) - referenced)
    writes = interrupted_writes()
    leftovers = [str(p) for p in store.leftovers()] + [p for write in writes for p in write["leftovers"]]
    repaired, kept = _repair(store, orphans, writes) if repair else ([], [])
    return DoctorReport(consistent=not problems, checked=checked, problems=tuple(problems),
                        orphans=() if repair else tuple(orphans), leftovers=() if repair else tuple(leftovers),
                        repaired=tuple(repaired), kept=tuple(kept))


def _repair(store: PackStore, orphans: list[str], writes: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    repaired: list[str] = []
    kept: list[str] = []
    for sha in orphans:
        if not store.owns(sha):
            kept.append(f"{store.path(sha)}: holds files a stored pack never has; left alone")
            continue
        _remove_tree(store.path(sha), f"unreferenced stored pack {sha[:12]}", repaired, kept)
    for leftover in store.leftovers():
        _remove_tree(leftover, f"interrupted write {leftover.name}", repaired, kept)
    for write in writes:
        try:
            repaired += [f"deleted interrupted output {p}" for p in remove_interrupted(write)]
        except OSError as exc:
            kept.append(f"{write['output']}: {exc.strerror or exc}")
    return repaired, kept


def _remove_tree(path: Path, label: str, repaired: list[str], kept: list[str]) -> None:
    try:
        shutil.rmtree(path)
    except OSError as exc:
        kept.append(f"{path}: could not delete ({exc.strerror or exc})")
    else:
        repaired.append(f"deleted {label}")
