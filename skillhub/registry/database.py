"""The registry's database: engines (SQLite or any SQLAlchemy URL), schema upgrades,
transactions, the lookups every concept module shares, and the event log.

SQLite runs in WAL mode with write transactions taken as ``BEGIN IMMEDIATE`` and a busy
timeout, so concurrent ``skillhub add`` processes queue instead of failing; PostgreSQL
writers serialise on an advisory lock (see :mod:`skillhub.registry.migrations`).
"""

from __future__ import annotations

import getpass
import json
import os
import random
import re
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from skillhub.errors import NotFoundError, ReadOnlyRegistryError, RegistryError
from skillhub.registry.migrations import applied_migrations, lock_registry, migrate, migration_names
from skillhub.registry.tables import BaseModelRow, EventRow, PackRow

DATABASE_FILE = "registry.db"
STORE_DIR = "packs"
_PACK_ID = re.compile(r"[0-9a-f]{1,64}")
_BUSY_TIMEOUT_S = 60  # how long a writer queues for the lock before giving up


def now() -> str:
    """A registry timestamp: UTC, microseconds, ``Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


def display(where: str) -> str:
    """A registry location fit for messages: a database URL without its password."""
    if "://" not in where:
        return where
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(where).render_as_string(hide_password=True)
    except ArgumentError:
        return where.split("://", 1)[0] + "://..."


def sql_reason(exc: SQLAlchemyError) -> str:
    """The first line of what the database driver said."""
    return str(exc.orig if getattr(exc, "orig", None) is not None else exc).splitlines()[0]


def _switch_to_wal(cursor: sqlite3.Cursor) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another process switches the same new database.

    SQLite answers "database is locked" at once, without waiting out the busy timeout, when two
    connections switch a fresh database to WAL together (four ``skillhub add`` on a new registry).
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT_S
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.01, 0.05))


def _sqlite_engine(path: Path, *, read_only: bool = False) -> Engine:
    if read_only:
        # A registry the user may only read: no WAL switch, no write lock, nothing created.
        if not path.is_file():
            raise RegistryError(f"no registry database at {path}")
        # Without a -wal file there is nothing uncommitted to read, and SQLite could not create the
        # -shm index it wants in a read-only directory: read the file as immutable then.
        wal = path.with_name(path.name + "-wal").exists()
        return create_engine(f"sqlite:///file:{path}?mode=ro{'' if wal else '&immutable=1'}&uri=true",
                             connect_args={"timeout": _BUSY_TIMEOUT_S})
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": _BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection, _record) -> None:
        # Let SQLAlchemy's "begin" below open transactions, as BEGIN IMMEDIATE: a writer takes
        # the write lock up front and waits for it (busy timeout) instead of failing mid-way.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_S * 1000}")
        _switch_to_wal(cursor)
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


class Database:
    """The registry's metadata: an engine, the schema brought up to date, and transactions.

    A database the process may not write (a read-only directory), or one upgraded by a newer
    skillhub, opens for reading; ``read_only`` then says why writes are refused.

    Raises:
        RegistryError: It cannot be opened, or needs an upgrade it may not get.
    """

    def __init__(self, where: str) -> None:
        self.read_only: str | None = None
        try:
            if "://" in where:
                self.url = where
                self.engine = _url_engine(where)
            else:
                directory = Path(where)
                if directory.is_dir() and not os.access(directory, os.W_OK):
                    self.read_only = f"the registry directory {directory} is read-only"
                else:
                    directory.mkdir(parents=True, exist_ok=True)
                self.url = str(directory)
                self.engine = _sqlite_engine(directory / DATABASE_FILE, read_only=self.read_only is not None)
            self._upgrade(display(where))
        except OSError as exc:
            raise RegistryError(f"cannot use registry {display(where)}: {exc.strerror or exc}") from exc
        except SQLAlchemyError as exc:
            raise RegistryError(f"cannot open registry {display(where)}: {sql_reason(exc)}") from exc

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

    def require_writable(self) -> None:
        """Raises ReadOnlyRegistryError (with the reason) if writes are refused."""
        if self.read_only:
            raise ReadOnlyRegistryError(f"cannot change the registry: {self.read_only}")

    @contextmanager
    def session(self, *, write: bool = False) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any error; ``write`` serializes writers."""
        if write:
            self.require_writable()
        try:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                if write:
                    lock_registry(session.connection())
                yield session
        except SQLAlchemyError as exc:
            raise RegistryError(f"registry database error: {sql_reason(exc)}") from exc


def find_base(session: Session, base: str | None) -> BaseModelRow:
    """The base model named ``base`` (name, fingerprint or location), or the only one."""
    bases = list(session.scalars(select(BaseModelRow)))
    if base is not None:
        for row in bases:
            if base in (row.name, row.fingerprint, row.location):
                return row
        raise NotFoundError("base model", base, known=[b.name for b in bases])
    if len(bases) == 1:
        return bases[0]
    if not bases:
        raise NotFoundError("base model", None)
    raise RegistryError(f"the registry holds several base models ({', '.join(b.name for b in bases)}): pass --base")


def find_pack(session: Session, pack_id: str) -> PackRow:
    """The pack whose id starts with ``pack_id`` (hex digits, matched literally)."""
    if not _PACK_ID.fullmatch(pack_id):
        raise NotFoundError("pack", pack_id, detail="(a pack id is hex digits; a prefix of one is enough)")
    matches = list(session.scalars(select(PackRow).where(PackRow.id.startswith(pack_id, autoescape=True))))
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise NotFoundError("pack", pack_id)
    raise RegistryError(f"pack id {pack_id!r} is ambiguous ({len(matches)} packs): give more characters")


def log_event(session: Session, base: BaseModelRow, kind: str, *, pack: str | None = None, task: str | None = None,
              **detail: Any) -> EventRow:
    """Append one event to the lineage log of ``base``."""
    row = EventRow(base_id=base.id, kind=kind, pack_id=pack, task=task, detail=json.dumps(detail),
                   actor=_actor(), at=now())
    session.add(row)
    return row
