"""Routers and routing example sets of a base model, as stored rows.

The registry only keeps what :mod:`skillhub.routing` trains: a spec (JSON) and arrays
(safetensors bytes, never a pickle), the latest row of a base being its router, and the
files of routing examples a task was given (checked by sha256, like eval sets). Whether a
router is stale is decided by :mod:`skillhub.routing` against the lineage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sqlalchemy import select

from skillhub.errors import RegistryError
from skillhub.registry.database import Database, find_base, log_event, now
from skillhub.registry.results import EvalSet, StoredRouter
from skillhub.registry.tables import RouterRow, RoutingSetRow

BASE_CLASS = "@base"  # the routing-set name of prompts that no pack should answer


def save_router(db: Database, spec: dict[str, Any], arrays: bytes, *, base: str | None) -> int:
    """Store a trained router as the base's current one; returns the lineage step that trained it."""
    with db.session(write=True) as session:
        base_row = find_base(session, base)
        event = log_event(session, base_row, "route-train", labels=spec.get("labels"), layer=spec.get("layer"),
                          classes=[c["name"] for c in spec.get("classes", [])])
        session.flush()
        session.add(RouterRow(base_id=base_row.id, step=event.id, spec=json.dumps(spec), arrays=arrays,
                              created_at=now()))
        return event.id


def load_router(db: Database, *, base: str | None) -> StoredRouter | None:
    """The base's current router, or None if it never had one."""
    with db.session() as session:
        base_row = find_base(session, base)
        row = session.scalars(select(RouterRow).where(RouterRow.base_id == base_row.id)
                              .order_by(RouterRow.id.desc())).first()
        if row is None:
            return None
        return StoredRouter(base=base_row.name, fingerprint=base_row.fingerprint, location=base_row.location,
                            step=row.step, spec=json.loads(row.spec), arrays=bytes(row.arrays),
                            created_at=row.created_at)


def add_routing_set(db: Database, name: str, path: str | os.PathLike[str], *, base: str | None) -> EvalSet:
    """Give class ``name`` (a task, or ``@base``) a file of routing examples (replacing an earlier one)."""
    from skillhub.scoring.datasets import load_prompts
    from skillhub.pack.format import sha256_file
    from skillhub.pack.names import check_name

    if name != BASE_CLASS:
        check_name(name, "task")
    resolved = Path(path).resolve()
    load_prompts(resolved)  # refuse a bad file before touching the database
    digest = sha256_file(resolved)
    with db.session(write=True) as session:
        base_row = find_base(session, base)
        row = session.scalars(select(RoutingSetRow).where(RoutingSetRow.base_id == base_row.id,
                                                          RoutingSetRow.name == name)).first()
        if row is None:
            row = RoutingSetRow(base_id=base_row.id, name=name, path=str(resolved), sha256=digest)
            session.add(row)
        else:
            row.path, row.sha256 = str(resolved), digest
        log_event(session, base_row, "route-examples", task=name, path=str(resolved), sha256=digest)
    return EvalSet(name=name, path=resolved, metric="routing")


def routing_sets(db: Database, *, base: str | None) -> list[EvalSet]:
    """Every routing example file of the base, checked against its recorded sha256."""
    from skillhub.pack.format import sha256_file

    with db.session() as session:
        base_row = find_base(session, base)
        rows = list(session.scalars(select(RoutingSetRow).where(RoutingSetRow.base_id == base_row.id)
                                    .order_by(RoutingSetRow.name)))
    for row in rows:
        if not Path(row.path).is_file() or sha256_file(Path(row.path)) != row.sha256:
            raise RegistryError(f"the routing examples of {row.name} ({row.path}) changed or vanished since they were "
                                f"given; give them again with `skillhub route examples {row.name} FILE`")
    return [EvalSet(name=r.name, path=Path(r.path), metric="routing") for r in rows]
