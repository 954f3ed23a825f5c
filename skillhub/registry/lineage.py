"""The lineage of a base model: packs added in order, removed (unlearned), listed, and the
event log that replays how the registry got where it is.

Adding writes a pack's files to the store first and then, in one transaction, its row and
its event, so an interrupted add leaves either nothing or at worst an unreferenced stored
copy that ``doctor`` reports and a retry reuses.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlmodel import Session

from skillhub.errors import MismatchError, RegistryError
from skillhub.pack.manifest import BaseRef
from skillhub.pack.names import base_name_from, check_name
from skillhub.registry.database import Database, find_base, find_pack, log_event, now
from skillhub.registry.results import AddedPack, BaseEntry, Event, PackDetails, PackEntry, RegisteredBase
from skillhub.registry.store import PackStore
from skillhub.registry.tables import BaseModelRow, EventRow, PackRow, TaskPackRow
from skillhub.registry.tasks import ensure_task, replace_task_set, task_sets

if TYPE_CHECKING:
    from skillhub.pack.format import SkillPack

_log = logging.getLogger(__name__)

# A pack's public fields and the columns they come from: one table for entries and listings.
PACK_FIELDS = {
    "id": PackRow.id, "name": PackRow.name, "task": PackRow.task, "version": PackRow.version,
    "sha256": PackRow.sha256, "bytes": PackRow.bytes, "ratio": PackRow.ratio, "parent": PackRow.parent_id,
    "state": PackRow.state, "purged": PackRow.purged, "position": PackRow.position, "added_at": PackRow.added_at,
}


def describe(row: PackRow, base: BaseModelRow) -> PackEntry:
    """A pack's registry entry."""
    return PackEntry(**_fields(row), base=base.name)


def _fields(row: PackRow) -> dict[str, Any]:
    return {field: getattr(row, column.key) for field, column in PACK_FIELDS.items()}


def match_base(bases: list[BaseModelRow], recorded: BaseRef, *, base: str | None,
               new_base: bool) -> BaseModelRow | None:
    """The registered base a pack made for ``recorded`` belongs to (None: it starts a new one)."""
    fingerprint = recorded.fingerprint
    if base is not None:
        named = next((b for b in bases if b.name == base), None)
        if named is not None and named.fingerprint != fingerprint:
            raise MismatchError(
                f"the pack was made for base {recorded.id} ({fingerprint[:19]}...), not for the registered base "
                f"{named.name} ({named.fingerprint[:19]}...): the weights differ"
            )
        if named is not None:
            return named
    same = next((b for b in bases if b.fingerprint == fingerprint), None)
    if same is not None or not bases or new_base or base is not None:
        return same
    known = ", ".join(f"{b.name} ({b.fingerprint[:19]}...)" for b in bases)
    raise MismatchError(
        f"the pack was made for base {recorded.id} ({fingerprint[:19]}...), which differs from the registered "
        f"base model(s) {known}; pass --new-base to start a lineage for it"
    )


def registered_base(db: Database, recorded: BaseRef, *, base: str | None, new_base: bool) -> BaseModelRow | None:
    """:func:`match_base` against the bases registered now (its own read transaction)."""
    with db.session() as session:
        return match_base(list(session.scalars(select(BaseModelRow))), recorded, base=base, new_base=new_base)


def add_lineage(db: Database, store: PackStore, packs: Sequence[SkillPack], *, tasks: Sequence[str | None],
                task_sets_by_sha: Mapping[str, Sequence[str]], base: str | None, new_base: bool,
                base_location: str | None, adopt: bool) -> list[AddedPack]:
    """See :meth:`skillhub.registry.Registry.add_lineage`."""
    tasks = [check_name(t, "task") if t is not None else None for t in tasks]
    for pack in packs:
        pack.check_decodable(decode=True)  # a registered pack must be activatable: decode it once
    if len({p.base_fingerprint for p in packs}) > 1:
        raise MismatchError("the packs of one lineage must share a base model; these were made for different bases")
    recorded = packs[0].manifest.base
    if registered_base(db, recorded, base=base, new_base=new_base) is None and base is not None:
        check_name(base, "base")  # a new base gets this name: checked before copying any file
    addresses = [store.put(p, adopt=adopt) for p in packs]
    with db.session(write=True) as session:
        base_row = match_base(list(session.scalars(select(BaseModelRow))), recorded, base=base, new_base=new_base)
        if base_row is None:
            base_row = _new_base(session, recorded, base, base_location)
        added = [_add_row(session, base_row, pack, sha256, task or pack.task)
                 for pack, sha256, task in zip(packs, addresses, tasks)]
        for task_name, members in task_sets_by_sha.items():
            rows = [session.scalars(select(PackRow).where(PackRow.sha256 == sha)).first() for sha in members]
            if None in rows:
                raise RegistryError(f"the activation set of task {task_name!r} names a pack that is not registered")
            replace_task_set(session, base_row, task_name, rows)
        entries = [AddedPack(**_fields(row), base=base_row.name, event=event.id) for row, event in added]
    for entry in entries:
        _log.info("added pack %s (%s %s) for task %s of base %s", entry.id, entry.name, entry.version, entry.task,
                  entry.base)
    return entries


def register_base(db: Database, recorded: BaseRef, *, name: str | None, location: str) -> RegisteredBase:
    """See :meth:`skillhub.registry.Registry.register_base`."""
    with db.session(write=True) as session:
        bases = list(session.scalars(select(BaseModelRow)))
        same = next((b for b in bases if b.fingerprint == recorded.fingerprint), None)
        if same is not None:
            if name is not None and name != same.name:
                raise RegistryError(f"these weights are already registered as base {same.name}; "
                                    f"use --base {same.name}")
            row, created = same, False
        else:
            if name is not None and any(b.name == name for b in bases):
                raise MismatchError(f"a base named {name} is already registered with other weights; "
                                    "choose another --name")
            row, created = _new_base(session, recorded, name, location), True
        return RegisteredBase(name=row.name, location=row.location, fingerprint=row.fingerprint,
                              revision=row.revision, architecture=row.architecture, created=created)


def _new_base(session: Session, recorded: BaseRef, base: str | None, base_location: str | None) -> BaseModelRow:
    row = BaseModelRow(
        name=check_name(base, "base") if base else base_name_from(recorded.id),
        location=base_location or recorded.id, revision=recorded.revision, architecture=recorded.architecture,
        model_type=recorded.model_type, fingerprint=recorded.fingerprint, registered_at=now(),
    )
    session.add(row)
    session.flush()
    log_event(session, row, "base", name=row.name, fingerprint=row.fingerprint)
    return row


def _add_row(session: Session, base_row: BaseModelRow, opened: SkillPack, sha256: str,
             task_name: str) -> tuple[PackRow, EventRow]:
    existing = session.scalars(select(PackRow).where(PackRow.sha256 == sha256)).first()
    if existing is not None and existing.state == "active":
        raise RegistryError(f"pack {existing.id} ({existing.name} {existing.version}) is already in the registry")
    position = (session.scalar(select(func.max(PackRow.position))) or 0) + 1
    if existing is not None:  # re-adding a removed pack starts it over at the end of the lineage
        row = existing
        row.state, row.purged, row.position, row.task, row.added_at = "active", False, position, task_name, now()
    else:
        row = PackRow(
            id=sha256[:12], base_id=base_row.id, name=opened.name, task=task_name, version=opened.version,
            sha256=sha256, bytes=opened.manifest.stored_bytes, ratio=opened.manifest.ratio,
            parent_id=_parent_id(session, opened),
            state="active", purged=False, position=position, added_at=now(),
            manifest=json.dumps(opened.manifest),
        )
        session.add(row)
    ensure_task(session, base_row, task_name)
    source = opened.manifest.get("source")
    event = log_event(session, base_row, "add", pack=row.id, task=task_name, name=row.name,
                      version=row.version, sha256=sha256, **({"source": source} if source else {}))
    session.flush()
    return row, event


def _parent_id(session: Session, pack: SkillPack) -> str | None:
    if pack.manifest.parent_sha256 is None:
        return None
    row = session.scalars(select(PackRow).where(PackRow.sha256 == pack.manifest.parent_sha256)).first()
    return row.id if row else None


def remove(db: Database, store: PackStore, pack_id: str, *, purge: bool) -> PackEntry:
    """See :meth:`skillhub.registry.Registry.remove`."""
    with db.session(write=True) as session:
        row = find_pack(session, pack_id)
        base = session.get(BaseModelRow, row.base_id)
        if row.state == "removed" and (row.purged or not purge):
            raise RegistryError(f"pack {row.id} was already removed")
        was_active = row.state == "active"
        row.state = "removed"
        for link in session.scalars(select(TaskPackRow).where(TaskPackRow.pack_id == row.id)):
            session.delete(link)
        if was_active:
            log_event(session, base, "remove", pack=row.id, task=row.task, name=row.name, version=row.version)
        if purge:
            row.purged = True
            log_event(session, base, "purge", pack=row.id, task=row.task, sha256=row.sha256)
        described = describe(row, base)
    if purge:
        store.delete(described.sha256)
    _log.info("removed pack %s%s", described.id, " and deleted its files" if purge else "")
    return described


def list_packs(db: Database, *, base: str | None, include_removed: bool) -> list[PackEntry]:
    """Packs in lineage order (oldest first)."""
    with db.session() as session:
        # Plain column rows: building an ORM object per pack costs more than the query itself.
        query = select(*PACK_FIELDS.values(), BaseModelRow.name).join(BaseModelRow, PackRow.base_id == BaseModelRow.id)
        if base is not None:
            query = query.where(PackRow.base_id == find_base(session, base).id)
        if not include_removed:
            query = query.where(PackRow.state == "active")
        keys = (*PACK_FIELDS, "base")
        return [PackEntry(**dict(zip(keys, row))) for row in session.execute(query.order_by(PackRow.position))]


def show(db: Database, store: PackStore, pack_id: str) -> PackDetails:
    """One pack's entry, with its manifest and the tasks whose activation set holds it."""
    with db.session() as session:
        row = find_pack(session, pack_id)
        base = session.get(BaseModelRow, row.base_id)
        return PackDetails(**_fields(row), base=base.name, manifest=json.loads(row.manifest),
                           in_tasks=tuple(t.name for t in task_sets(session, base) if row.id in t.packs),
                           path=str(store.path(row.sha256)) if not row.purged else None)


def log(db: Database, *, base: str | None) -> list[Event]:
    """The lineage event log, oldest first."""
    with db.session() as session:
        query = select(EventRow.id, BaseModelRow.name, EventRow.kind, EventRow.pack_id, EventRow.task,
                       EventRow.detail, EventRow.actor, EventRow.at).join(BaseModelRow, EventRow.base_id == BaseModelRow.id)
        if base is not None:
            query = query.where(EventRow.base_id == find_base(session, base).id)
        return [
            Event(id=id_, base=base_name, kind=kind, pack=pack, task=task, detail=json.loads(detail), actor=actor, at=at)
            for id_, base_name, kind, pack, task, detail, actor, at in session.execute(query.order_by(EventRow.id))
        ]


def last_event(db: Database, *, base: str | None) -> int:
    """The id of the base's latest lineage event (0 before any): every change a reader of the lineage
    must notice (adds, removals, activation sets, eval sets, router training) appends one."""
    with db.session() as session:
        base_id = find_base(session, base).id
        return session.scalar(select(func.max(EventRow.id)).where(EventRow.base_id == base_id)) or 0


def bases(db: Database) -> list[BaseEntry]:
    """Every registered base model, in the order they were registered."""
    with db.session() as session:
        return [BaseEntry(row.name, row.location, row.fingerprint)
                for row in session.scalars(select(BaseModelRow).order_by(BaseModelRow.id))]


def manifests(db: Database, pack_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The recorded manifests of these full pack ids (one query; unknown ids are left out)."""
    with db.session() as session:
        rows = session.execute(select(PackRow.id, PackRow.manifest).where(PackRow.id.in_(list(pack_ids))))
        return {pack_id: json.loads(text) for pack_id, text in rows}
