"""The registry: per base model, the lineage of SkillPacks, task activation sets, unlearning by removal.

Metadata lives in a SQL database: by default ``<home>/registry.db`` (SQLite in WAL mode,
write transactions taken with ``BEGIN IMMEDIATE`` and a busy timeout, so concurrent
``skillhub add`` processes queue instead of failing), or any SQLAlchemy URL (PostgreSQL for a
shared team registry). Pack files live in a content-addressed :class:`PackStore`.

Adding a pack writes its files to the store first and then, in one transaction, its row and
its lineage event, so an interrupted ``add`` leaves either nothing or at worst an unreferenced
stored copy that ``doctor`` reports and a retry reuses. Activation (paper Eq. 10) always
starts from the pristine base: theta_t = theta_base + sum of the packs in S_t, summed in the
order they were added, so removing a pack yields exactly the weights of a registry that
never had it.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from skillhub import config
from skillhub.errors import MismatchError, PackError, SkillhubError
from skillhub.pack.manifest import TENSORS_FILE
from skillhub.pack.names import base_name_from, check_name
from skillhub.registry.migrations import applied_migrations, lock_registry, migrate, migration_names
from skillhub.progress import ProgressCallback, no_progress
from skillhub.registry.store import PackStore
from skillhub.registry.tables import BaseModelRow, EvalRecordRow, EventRow, PackRow, TaskPackRow, TaskRow

if TYPE_CHECKING:  # torch and the pack machinery load only for commands that touch weights
    import torch

    from skillhub.pack.format import SkillPack

DATABASE_FILE = "registry.db"
STORE_DIR = "packs"
_PACK_ID = re.compile(r"[0-9a-f]{1,64}")


class RegistryError(SkillhubError):
    """The registry cannot be opened or a registry operation is invalid."""


class NotFoundError(RegistryError):
    """A pack, task or base model named by the user does not exist."""


def _sql_reason(exc: SQLAlchemyError) -> str:
    return str(exc.orig if getattr(exc, "orig", None) is not None else exc).splitlines()[0]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


def _sqlite_engine(path: Path, *, read_only: bool = False) -> Engine:
    if read_only:
        # A registry the user may only read: no WAL switch, no write lock, nothing created.
        if not path.is_file():
            raise RegistryError(f"no registry database at {path}")
        # Without a -wal file there is nothing uncommitted to read, and SQLite could not create the
        # -shm index it wants in a read-only directory: read the file as immutable then.
        wal = path.with_name(path.name + "-wal").exists()
        return create_engine(f"sqlite:///file:{path}?mode=ro{'' if wal else '&immutable=1'}&uri=true",
                             connect_args={"timeout": 60})
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 60})

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection, _record) -> None:
        # Let SQLAlchemy's "begin" below open transactions, as BEGIN IMMEDIATE: a writer takes
        # the write lock up front and waits for it (busy timeout) instead of failing mid-way.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _url_engine(url: str) -> Engine:
    try:
        return create_engine(url)
    except ImportError as exc:  # the dialect's driver (a separate package) is missing
        scheme = url.split("://", 1)[0]
        hint = "pip install 'skillhub[postgres]'" if scheme.startswith("postgresql") else \
            f"install the SQLAlchemy driver for {scheme}"
        raise RegistryError(f"the database driver for {scheme} ({exc.name or exc}) is not installed: {hint}") from exc


def _display(where: str) -> str:
    """A registry location fit for messages: a database URL without its password."""
    if "://" not in where:
        return where
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(where).render_as_string(hide_password=True)
    except ArgumentError:
        return where.split("://", 1)[0] + "://..."


class Registry:
    """A SkillPack registry.

    A registry the process may not write (a read-only directory), or one upgraded by a newer
    skillhub, opens for reading: listings, ``show``, ``log`` and ``doctor`` work, and every
    write is refused with the reason.

    Args:
        location: A registry directory, or an SQLAlchemy URL for the metadata
            (default: ``$SKILLHUB_HOME``, else the platform user data dir).
        store: Directory of pack files (default: ``<location>/packs``, or ``<home>/packs`` for a URL).

    Raises:
        RegistryError: The directory or database cannot be opened, or needs an upgrade it may not get.
    """

    def __init__(self, location: str | os.PathLike[str] | None = None, *, store: str | os.PathLike[str] | None = None):
        where = str(location) if location is not None else str(config.home())
        self.read_only: str | None = None  # why writes are refused, when they are
        try:
            if "://" in where:
                self.url = where
                self.engine = _url_engine(where)
                store_root = Path(store) if store else config.home() / STORE_DIR
            else:
                directory = Path(where)
                if directory.is_dir() and not os.access(directory, os.W_OK):
                    self.read_only = f"the registry directory {directory} is read-only"
                else:
                    directory.mkdir(parents=True, exist_ok=True)
                self.url = str(directory)
                self.engine = _sqlite_engine(directory / DATABASE_FILE, read_only=self.read_only is not None)
                store_root = Path(store) if store else directory / STORE_DIR
            self._upgrade(_display(where))
        except OSError as exc:
            raise RegistryError(f"cannot use registry {_display(where)}: {exc.strerror or exc}") from exc
        except SQLAlchemyError as exc:
            raise RegistryError(f"cannot open registry {_display(where)}: {_sql_reason(exc)}") from exc
        self.store = PackStore(store_root)

    @property
    def display_url(self) -> str:
        """Where the registry is, fit to print: a database URL without its password."""
        return _display(self.url)

    def _upgrade(self, where: str) -> None:
        """Apply pending migrations, or note why this registry may only be read."""
        applied, known = set(applied_migrations(self.engine)), set(migration_names())
        newer = sorted(applied - known)
        if newer:
            self.read_only = (f"the registry {where} was upgraded by a newer skillhub (migration {newer[-1]}); "
                              "it can be read, but upgrade skillhub to change it")
        elif known - applied:
            if self.read_only:
                raise RegistryError(f"{self.read_only} and needs an upgrade: open it once with write access")
            migrate(self.engine)

    def _require_writable(self) -> None:
        if self.read_only:
            raise RegistryError(f"cannot change the registry: {self.read_only}")

    # ------------------------------------------------------------------ sessions and lookups

    @contextmanager
    def _session(self, *, write: bool = False) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any error; ``write`` serializes writers."""
        if write:
            self._require_writable()
        try:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                if write:
                    lock_registry(session.connection())
                yield session
        except SQLAlchemyError as exc:
            raise RegistryError(f"registry database error: {_sql_reason(exc)}") from exc

    def _base(self, session: Session, base: str | None) -> BaseModelRow:
        bases = list(session.scalars(select(BaseModelRow)))
        if base is not None:
            for row in bases:
                if base in (row.name, row.fingerprint, row.location):
                    return row
            raise NotFoundError(f"no base model {base!r} in the registry; known: {', '.join(b.name for b in bases) or 'none'}")
        if len(bases) == 1:
            return bases[0]
        if not bases:
            raise NotFoundError("the registry has no base model yet: `skillhub add` a pack first")
        raise RegistryError(f"the registry holds several base models ({', '.join(b.name for b in bases)}): pass --base")

    def _pack(self, session: Session, pack_id: str) -> PackRow:
        if not _PACK_ID.fullmatch(pack_id):
            raise NotFoundError(f"{pack_id!r} is not a pack id: ids are hex digits (a prefix of one is enough); "
                                "`skillhub list` shows them")
        query = select(PackRow).where(PackRow.id.startswith(pack_id, autoescape=True))
        matches = list(session.scalars(query))
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise NotFoundError(f"no pack {pack_id!r} in the registry; `skillhub list` shows the pack ids")
        raise RegistryError(f"pack id {pack_id!r} is ambiguous ({len(matches)} packs): give more characters")

    def _log(self, session: Session, base: BaseModelRow, kind: str, *, pack: str | None = None,
             task: str | None = None, **detail: Any) -> EventRow:
        row = EventRow(base_id=base.id, kind=kind, pack_id=pack, task=task, detail=json.dumps(detail),
                       actor=_actor(), at=_now())
        session.add(row)
        return row

    # ------------------------------------------------------------------ adding

    def add(self, pack: str | os.PathLike[str] | SkillPack, *, task: str | None = None, base: str | None = None,
            new_base: bool = False, base_location: str | None = None) -> dict[str, Any]:
        """Add a pack (verified, stored by content) to the lineage of its base model.

        Args:
            pack: A pack directory or an opened pack.
            task: The task it teaches (default: the task in its manifest).
            base: Name of the registered base it must belong to (default: found by fingerprint).
            new_base: Register the pack's base model if the registry does not know it yet,
                even though other bases are registered.
            base_location: Where the base's weights are (local dir or Hub id) for later activation
                (default: the base id recorded in the pack).

        Returns:
            The pack's registry entry.

        Raises:
            MismatchError: The pack was made for a base other than the registered one.
            PackError: The pack is corrupt or fails its schema.
        """
        return self.add_lineage([pack], tasks=[task], base=base, new_base=new_base, base_location=base_location)[0]

    def add_lineage(self, packs: Sequence[str | os.PathLike[str] | SkillPack], *,
                    tasks: Sequence[str | None] | None = None, task_sets: Mapping[str, Sequence[str]] | None = None,
                    base: str | None = None, new_base: bool = False, base_location: str | None = None,
                    adopt: bool = False) -> list[dict[str, Any]]:
        """Add packs of one base model in lineage order, all or none (one transaction).

        Args:
            packs: Pack directories or opened packs, oldest first.
            tasks: The task of each pack (None: the task in its manifest).
            task_sets: Explicit activation sets to set: task -> sha256 addresses of its packs
                (packs of this call or ones already registered).
            base, new_base, base_location: As :meth:`add`.
            adopt: The pack directories are temporary copies under the store's incoming
                directory: move them into the store instead of copying.

        Returns:
            The packs' registry entries, in order; each names the lineage event that added it.

        Raises:
            MismatchError: The packs were made for a base other than the registered one.
            RegistryError: A pack is already active in the registry.
        """
        from skillhub.pack.format import SkillPack, load_pack

        self._require_writable()
        opened = [p if isinstance(p, SkillPack) else load_pack(p) for p in packs]
        tasks = [check_name(t, "task") if t is not None else None
                 for t in (tasks if tasks is not None else [None] * len(opened))]
        for pack in opened:
            pack.check_decodable(decode=True)  # a registered pack must be activatable: decode it once
        fingerprints = {p.base_fingerprint for p in opened}
        if len(fingerprints) > 1:
            raise MismatchError("the packs of one lineage must share a base model; these were made for different bases")
        recorded = opened[0].manifest["base"]
        if self.check_base(recorded, base=base, new_base=new_base) is None and base is not None:
            check_name(base, "base")  # a new base gets this name: checked before copying any file
        addresses = [self.store.put(p, adopt=adopt) for p in opened]
        with self._session(write=True) as session:
            bases = list(session.scalars(select(BaseModelRow)))
            base_row = self._match_base(bases, recorded, base=base, new_base=new_base)
            if base_row is None:
                base_row = BaseModelRow(
                    name=check_name(base, "base") if base else base_name_from(recorded["id"]), location=base_location or recorded["id"], revision=recorded["revision"],
                    architecture=recorded["architecture"], model_type=recorded["model_type"],
                    fingerprint=recorded["fingerprint"], registered_at=_now(),
                )
                session.add(base_row)
                session.flush()
                self._log(session, base_row, "base", name=base_row.name, fingerprint=base_row.fingerprint)
            added = [self._add_row(session, base_row, pack, sha256, task or pack.task)
                     for pack, sha256, task in zip(opened, addresses, tasks)]
            for task_name, members in (task_sets or {}).items():
                rows = [session.scalars(select(PackRow).where(PackRow.sha256 == sha)).first() for sha in members]
                if None in rows:
                    raise RegistryError(f"the activation set of task {task_name!r} names a pack that is not registered")
                self._set_task(session, base_row, task_name, rows)
            return [{**self._describe(row, base_row), "event": event.id} for row, event in added]

    def _add_row(self, session: Session, base_row: BaseModelRow, opened: SkillPack, sha256: str,
                 task_name: str) -> tuple[PackRow, EventRow]:
        existing = session.scalars(select(PackRow).where(PackRow.sha256 == sha256)).first()
        if existing is not None and existing.state == "active":
            raise RegistryError(f"pack {existing.id} ({existing.name} {existing.version}) is already in the registry")
        position = (session.scalar(select(func.max(PackRow.position))) or 0) + 1
        if existing is not None:  # re-adding a removed pack starts it over at the end of the lineage
            row = existing
            row.state, row.purged, row.position, row.task, row.added_at = "active", False, position, task_name, _now()
        else:
            row = PackRow(
                id=sha256[:12], base_id=base_row.id, name=opened.name, task=task_name, version=opened.version,
                sha256=sha256, bytes=opened.manifest["totals"]["stored_bytes"],
                ratio=opened.manifest["totals"]["ratio"], parent_id=self._parent_id(session, opened),
                state="active", purged=False, position=position, added_at=_now(),
                manifest=json.dumps(opened.manifest),
            )
            session.add(row)
        self._ensure_task(session, base_row, task_name)
        source = opened.manifest.get("source")
        event = self._log(session, base_row, "add", pack=row.id, task=task_name, name=row.name,
                          version=row.version, sha256=sha256, **({"source": source} if source else {}))
        session.flush()
        return row, event

    def check_base(self, recorded: Mapping[str, Any], *, base: str | None = None,
                   new_base: bool = False) -> BaseModelRow | None:
        """Check that a pack made for the base ``recorded`` (its manifest's ``base``) may be added.

        Returns:
            The registered base it belongs to, or None if adding it registers a new base.

        Raises:
            MismatchError: It was made for other weights than the registered base model.
        """
        with self._session() as session:
            return self._match_base(list(session.scalars(select(BaseModelRow))), recorded, base=base,
                                    new_base=new_base)

    @staticmethod
    def _match_base(bases: list[BaseModelRow], recorded: Mapping[str, Any], *, base: str | None,
                    new_base: bool) -> BaseModelRow | None:
        fingerprint = recorded["fingerprint"]
        if base is not None:
            named = next((b for b in bases if b.name == base), None)
            if named is not None and named.fingerprint != fingerprint:
                raise MismatchError(
                    f"the pack was made for base {recorded['id']} ({fingerprint[:19]}...), not for the registered base "
                    f"{named.name} ({named.fingerprint[:19]}...): the weights differ"
                )
            if named is not None:
                return named
        same = next((b for b in bases if b.fingerprint == fingerprint), None)
        if same is not None or not bases or new_base or base is not None:
            return same
        known = ", ".join(f"{b.name} ({b.fingerprint[:19]}...)" for b in bases)
        raise MismatchError(
            f"the pack was made for base {recorded['id']} ({fingerprint[:19]}...), which differs from the registered "
            f"base model(s) {known}; pass --new-base to start a lineage for it"
        )

    def _parent_id(self, session: Session, pack: SkillPack) -> str | None:
        parent = pack.manifest.get("parent")
        if not parent:
            return None
        row = session.scalars(select(PackRow).where(PackRow.sha256 == parent["sha256"])).first()
        return row.id if row else None

    def _ensure_task(self, session: Session, base: BaseModelRow, name: str) -> TaskRow:
        check_name(name, "task")
        row = session.scalars(select(TaskRow).where(TaskRow.base_id == base.id, TaskRow.name == name)).first()
        if row is None:
            row = TaskRow(base_id=base.id, name=name, explicit=False)
            session.add(row)
            session.flush()
        return row

    # ------------------------------------------------------------------ reading

    # A pack's public fields and the columns they come from: one table for entries and listings.
    _PACK_FIELDS = {
        "id": PackRow.id, "name": PackRow.name, "task": PackRow.task, "version": PackRow.version,
        "sha256": PackRow.sha256, "bytes": PackRow.bytes, "ratio": PackRow.ratio, "parent": PackRow.parent_id,
        "state": PackRow.state, "purged": PackRow.purged, "position": PackRow.position, "added_at": PackRow.added_at,
    }

    @classmethod
    def _describe(cls, row: PackRow, base: BaseModelRow | None = None) -> dict[str, Any]:
        described = {field: getattr(row, column.key) for field, column in cls._PACK_FIELDS.items()}
        if base is not None:
            described["base"] = base.name
        return described

    def list_packs(self, *, base: str | None = None, include_removed: bool = False) -> list[dict[str, Any]]:
        """Packs in lineage order (oldest first)."""
        with self._session() as session:
            # Plain column rows: building an ORM object per pack costs more than the query itself.
            query = select(*self._PACK_FIELDS.values(), BaseModelRow.name).join(
                BaseModelRow, PackRow.base_id == BaseModelRow.id)
            if base is not None:
                query = query.where(PackRow.base_id == self._base(session, base).id)
            if not include_removed:
                query = query.where(PackRow.state == "active")
            keys = (*self._PACK_FIELDS, "base")
            return [dict(zip(keys, row)) for row in session.execute(query.order_by(PackRow.position))]

    def show(self, pack_id: str) -> dict[str, Any]:
        """One pack's entry, with its manifest and the tasks whose activation set holds it."""
        with self._session() as session:
            row = self._pack(session, pack_id)
            base = session.get(BaseModelRow, row.base_id)
            described = self._describe(row, base)
            described["manifest"] = json.loads(row.manifest)
            described["in_tasks"] = [t["name"] for t in self._tasks(session, base) if row.id in t["packs"]]
            described["path"] = str(self.store.path(row.sha256)) if not row.purged else None
            return described

    def log(self, *, base: str | None = None) -> list[dict[str, Any]]:
        """The lineage event log, oldest first."""
        with self._session() as session:
            query = select(EventRow.id, BaseModelRow.name, EventRow.kind, EventRow.pack_id, EventRow.task,
                           EventRow.detail, EventRow.actor, EventRow.at).join(
                BaseModelRow, EventRow.base_id == BaseModelRow.id)
            if base is not None:
                query = query.where(EventRow.base_id == self._base(session, base).id)
            return [
                {"id": id_, "base": base_name, "kind": kind, "pack": pack, "task": task, "detail": json.loads(detail),
                 "actor": actor, "at": at}
                for id_, base_name, kind, pack, task, detail, actor, at in session.execute(query.order_by(EventRow.id))
            ]

    def _tasks(self, session: Session, base: BaseModelRow) -> list[dict[str, Any]]:
        active = list(session.scalars(
            select(PackRow).where(PackRow.base_id == base.id, PackRow.state == "active").order_by(PackRow.position)))
        members: dict[int, set[str]] = {}
        for link in session.scalars(select(TaskPackRow)):
            members.setdefault(link.task_id, set()).add(link.pack_id)
        tasks = []
        for task in session.scalars(select(TaskRow).where(TaskRow.base_id == base.id).order_by(TaskRow.name)):
            chosen = members.get(task.id, set()) if task.explicit else {p.id for p in active if p.task == task.name}
            tasks.append({"name": task.name, "explicit": task.explicit,
                          "packs": [p.id for p in active if p.id in chosen]})
        return tasks

    def tasks(self, *, base: str | None = None) -> list[dict[str, Any]]:
        """Every task of a base with its activation set S_t (pack ids in lineage order)."""
        with self._session() as session:
            return self._tasks(session, self._base(session, base))

    def set_task(self, task: str, pack_ids: Sequence[str], *, base: str | None = None) -> dict[str, Any]:
        """Make S_t exactly ``pack_ids`` (an empty list: the base model alone)."""
        with self._session(write=True) as session:
            base_row = self._base(session, base)
            self._set_task(session, base_row, task, [self._pack(session, p) for p in pack_ids])
            return next(t for t in self._tasks(session, base_row) if t["name"] == task)

    def _set_task(self, session: Session, base_row: BaseModelRow, task: str, packs: Sequence[PackRow]) -> None:
        for pack in packs:
            if pack.state != "active" or pack.base_id != base_row.id:
                raise RegistryError(f"pack {pack.id} is not an active pack of base {base_row.name}")
        row = self._ensure_task(session, base_row, task)
        row.explicit = True
        for link in session.scalars(select(TaskPackRow).where(TaskPackRow.task_id == row.id)):
            session.delete(link)
        session.flush()
        for pack in packs:
            session.add(TaskPackRow(task_id=row.id, pack_id=pack.id))
        self._log(session, base_row, "task-set", task=task, packs=[p.id for p in packs])

    # ------------------------------------------------------------------ evaluation

    def add_task(self, name: str, eval_path: str | os.PathLike[str], *, metric: str = "exact_match",
                 base: str | None = None) -> dict[str, Any]:
        """Give task ``name`` an eval set (its sha256 is kept, so a changed file is noticed).

        Raises:
            SkillhubError: The eval file is unusable for ``metric`` (nothing is recorded then).
        """
        from skillhub.evaluation.datasets import load_eval_set
        from skillhub.pack.format import sha256_file

        path = Path(eval_path).resolve()
        load_eval_set(path, metric)  # refuse a bad file before touching the database
        digest = sha256_file(path)
        with self._session(write=True) as session:
            base_row = self._base(session, base)
            row = self._ensure_task(session, base_row, name)
            row.eval_path, row.eval_sha256, row.metric = str(path), digest, metric
            self._log(session, base_row, "task-add", task=name, eval=str(path), sha256=digest, metric=metric)
            return {"name": name, "eval": str(path), "sha256": digest, "metric": metric}

    def eval_sets(self, *, base: str | None = None, task: str | None = None) -> list[dict[str, Any]]:
        """Tasks with an eval set, checked against the sha256 recorded when they were added.

        Raises:
            NotFoundError: ``task`` does not exist or has no eval set.
            RegistryError: An eval file changed or vanished since ``task add``.
        """
        from skillhub.pack.format import sha256_file

        with self._session() as session:
            base_row = self._base(session, base)
            rows = list(session.scalars(select(TaskRow).where(TaskRow.base_id == base_row.id,
                                                              TaskRow.eval_path.is_not(None)).order_by(TaskRow.id)))
        if task is not None:
            rows = [r for r in rows if r.name == task]
            if not rows:
                raise NotFoundError(f"no task {task!r} with an eval set; add one with `skillhub task add {task} --eval FILE`")
        sets = []
        for row in rows:
            path = Path(row.eval_path)
            if not path.is_file() or sha256_file(path) != row.eval_sha256:
                raise RegistryError(
                    f"the eval file of task {row.name} ({path}) changed or vanished since it was added; "
                    f"register it again with `skillhub task add {row.name} --eval FILE`"
                )
            sets.append({"name": row.name, "path": path, "metric": row.metric})
        return sets

    def record_scores(self, records: list[dict[str, Any]], *, base: str | None = None, step: int | None = None) -> int:
        """Store evaluation records at lineage step ``step`` (default: a new ``eval`` event); returns the step."""
        with self._session(write=True) as session:
            base_row = self._base(session, base)
            if step is None:
                self._log(session, base_row, "eval", tasks=sorted({r["task"] for r in records}))
                session.flush()
                step = session.scalar(select(func.max(EventRow.id)))
            for record in records:
                session.add(EvalRecordRow(base_id=base_row.id, step=step, at=_now(), **record))
            return step

    def scores(self, *, base: str | None = None) -> list[dict[str, Any]]:
        """Every evaluation record with the event it belongs to, oldest first."""
        with self._session() as session:
            base_row = self._base(session, base)
            query = (select(EvalRecordRow, EventRow).join(EventRow, EvalRecordRow.step == EventRow.id)
                     .where(EvalRecordRow.base_id == base_row.id).order_by(EvalRecordRow.step, EvalRecordRow.id))
            return [{"step": r.step, "event": e.kind, "event_task": e.task, "task": r.task, "policy": r.policy,
                     "metric": r.metric, "score": r.score} for r, e in session.execute(query)]

    # ------------------------------------------------------------------ activation and removal

    def activation_set(self, *, task: str | None = None, packs: Sequence[str] | None = None,
                       base: str | None = None) -> tuple[dict[str, Any], list[SkillPack]]:
        """The base entry and the opened packs of S_t (or of an explicit list), in lineage order."""
        if (task is None) == (packs is None):
            raise RegistryError("give exactly one of a task or a list of packs")
        with self._session() as session:
            base_row = self._base(session, base)
            if task is not None:
                found = next((t for t in self._tasks(session, base_row) if t["name"] == task), None)
                if found is None:
                    known = ", ".join(t["name"] for t in self._tasks(session, base_row)) or "none"
                    raise NotFoundError(f"no task {task!r} for base {base_row.name}; known tasks: {known}")
                ids = found["packs"]
            else:
                ids = [self._pack(session, p).id for p in packs]
            rows = sorted((self._pack(session, i) for i in ids), key=lambda r: r.position)
            for row in rows:
                if row.state != "active" or row.base_id != base_row.id:
                    raise RegistryError(f"pack {row.id} is not an active pack of base {base_row.name}")
            base_entry = {"name": base_row.name, "location": base_row.location, "fingerprint": base_row.fingerprint}
            shas = [r.sha256 for r in rows]
        return base_entry, [self.store.open(sha) for sha in shas]

    def activate(self, output: str | os.PathLike[str], *, task: str | None = None, packs: Sequence[str] | None = None,
                 base: str | None = None, base_location: str | None = None, force: bool = False,
                 progress: ProgressCallback = no_progress) -> Path:
        """Write theta_base + sum of S_t as a Hugging Face checkpoint directory (paper Eq. 10)."""
        from skillhub.activation import apply_packs

        base_entry, opened = self.activation_set(task=task, packs=packs, base=base)
        location = base_location or base_entry["location"]
        return apply_packs(location, opened, output, force=force, progress=progress,
                           protect=[location if Path(location).exists() else None, self.store.root,
                                    None if "://" in self.url else self.url])

    @contextmanager
    def activated(self, model: torch.nn.Module, *, task: str | None = None, packs: Sequence[str] | None = None,
                  base: str | None = None, verify: bool = True) -> Iterator[torch.nn.Module]:
        """Patch a loaded ``transformers`` model with S_t in place; restore its exact bits on exit.

        Each patched weight is computed from a saved copy of the original, so switching from one
        task to another never accumulates error.

        Raises:
            MismatchError: ``verify`` and the model's weights are not the registered base.
        """
        import torch

        base_entry, opened = self.activation_set(task=task, packs=packs, base=base)
        for pack in opened:
            pack.check_decodable()
        parameters = dict(model.named_parameters())
        if verify:
            self._check_model_is_base(model, base_entry)
        touched = sorted({name for pack in opened for name in pack.modules})
        missing = [n for n in touched if n not in parameters]
        if missing:
            raise MismatchError(f"the model has no parameter(s) {', '.join(missing[:5])} that the packs change")
        originals = {name: parameters[name].detach().clone() for name in touched}
        try:
            with torch.no_grad():
                for name in touched:
                    weight = originals[name].to(torch.float32)
                    for pack in opened:
                        if name in pack.modules:
                            weight = weight + pack.decode(name).to(weight.device)
                    parameters[name].copy_(weight.to(originals[name].dtype))
            yield model
        finally:
            with torch.no_grad():
                for name, original in originals.items():
                    parameters[name].copy_(original)

    def verify_base_model(self, model: torch.nn.Module, *, base: str | None = None) -> None:
        """Check that a loaded model holds exactly the registered base weights.

        Raises:
            MismatchError: It does not (another model, or loaded in another dtype).
        """
        base_entry, _ = self.activation_set(packs=[], base=base)
        self._check_model_is_base(model, base_entry)

    @staticmethod
    def _check_model_is_base(model: torch.nn.Module, base_entry: dict[str, Any]) -> None:
        from skillhub.io.checkpoint import Fingerprint

        state = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied: not a tensor of its own in the checkpoint
        fingerprint = Fingerprint()
        for name, tensor in state.items():
            fingerprint.update(name, tensor)
        if fingerprint.hexdigest() != base_entry["fingerprint"]:
            raise MismatchError(
                f"the model's weights are not the registered base {base_entry['name']}: load it unchanged, in its "
                "stored dtype (or pass verify=False)"
            )

    def remove(self, pack_id: str, *, purge: bool = False) -> dict[str, Any]:
        """Unlearn a pack: drop it from the lineage's active packs and every activation set.

        With ``purge`` its files are deleted from the store as well.
        """
        with self._session(write=True) as session:
            row = self._pack(session, pack_id)
            base = session.get(BaseModelRow, row.base_id)
            if row.state == "removed" and (row.purged or not purge):
                raise RegistryError(f"pack {row.id} was already removed")
            was_active = row.state == "active"
            row.state = "removed"
            for link in session.scalars(select(TaskPackRow).where(TaskPackRow.pack_id == row.id)):
                session.delete(link)
            if was_active:
                self._log(session, base, "remove", pack=row.id, task=row.task, name=row.name, version=row.version)
            if purge:
                row.purged = True
                self._log(session, base, "purge", pack=row.id, task=row.task, sha256=row.sha256)
            described = self._describe(row, base)
        if purge:
            self.store.delete(described["sha256"])
        return described

    # ------------------------------------------------------------------ consistency

    def doctor(self, *, repair: bool = False) -> dict[str, Any]:
        """Check every stored pack against the database.

        Problems (the registry is inconsistent): a pack row whose files are missing, or whose files
        fail their sha256. Leftovers (harmless, removed by ``repair``): stored packs no row refers to,
        incoming directories of interrupted pulls and adds, and the temporary directories of outputs
        (``create``, ``apply``, ``activate``, ``pull -o``) whose process was killed. Only what provably
        is skillhub's is ever removed (see :mod:`skillhub.registry.store` and :mod:`skillhub.io.outputs`);
        ``repaired`` lists exactly what was deleted, ``kept`` what was found but left alone, and why.
        """
        from skillhub.io.outputs import interrupted_writes, remove_interrupted

        with self._session() as session:
            rows = list(session.scalars(select(PackRow)))
        problems, checked = [], 0
        for row in rows:
            if row.purged:
                continue
            checked += 1
            try:
                pack = self.store.open(row.sha256)
                if pack.manifest["files"][TENSORS_FILE]["sha256"] != row.sha256:
                    raise PackError("stored under the wrong address")
            except PackError as exc:
                problems.append({"pack": row.id, "problem": str(exc)})
        referenced = {row.sha256 for row in rows if not row.purged}
        orphans = sorted(set(self.store.addresses()) - referenced)
        leftovers = [str(p) for p in self.store.leftovers()]
        writes = interrupted_writes()
        leftovers += [p for write in writes for p in write["leftovers"]]
        repaired, kept = [], []
        if repair:
            self._require_writable()
            for sha in orphans:
                if not self.store.owns(sha):
                    kept.append(f"{self.store.path(sha)}: holds files a stored pack never has; left alone")
                    continue
                self._remove_tree(self.store.path(sha), f"unreferenced stored pack {sha[:12]}", repaired, kept)
            for leftover in self.store.leftovers():
                self._remove_tree(leftover, f"interrupted write {leftover.name}", repaired, kept)
            for write in writes:
                try:
                    repaired += [f"deleted interrupted output {p}" for p in remove_interrupted(write)]
                except OSError as exc:
                    kept.append(f"{write['output']}: {exc.strerror or exc}")
        return {
            "consistent": not problems,
            "checked": checked,
            "problems": problems,
            "orphans": [] if repair else orphans,
            "leftovers": [] if repair else leftovers,
            "repaired": repaired,
            "kept": kept,
        }

    @staticmethod
    def _remove_tree(path: Path, label: str, repaired: list[str], kept: list[str]) -> None:
        try:
            shutil.rmtree(path)
        except OSError as exc:
            kept.append(f"{path}: could not delete ({exc.strerror or exc})")
        else:
            repaired.append(f"deleted {label}")
