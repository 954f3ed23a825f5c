"""Applying the ordered migrations of ``registry/`` (shipped as ``skillhub._registry``).

Each migration runs in its own transaction together with the row that records it, under a
lock (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: a transaction-scoped advisory lock), so two
processes opening a new registry at once apply every migration exactly once.
"""

from __future__ import annotations

import importlib
from datetime import datetime, timezone
from importlib import resources

from sqlalchemy import Column, Engine, MetaData, String, Table, select

MIGRATIONS_TABLE = "skillhub_migrations"
_ADVISORY_LOCK = 0x5B111_4B  # any constant shared by every skillhub process

_metadata = MetaData()
_applied = Table(
    MIGRATIONS_TABLE, _metadata,
    Column("name", String(128), primary_key=True),
    Column("applied_at", String(32), nullable=False),
)


def migration_names() -> list[str]:
    """Every migration shipped with this skillhub, in the order they apply."""
    files = resources.files("skillhub._registry").iterdir()
    return sorted(f.name.removesuffix(".py") for f in files if f.name.startswith("m") and f.name.endswith(".py"))


def lock_registry(connection) -> None:
    """Serialize writers for the rest of the transaction (SQLite already does, with BEGIN IMMEDIATE)."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_ADVISORY_LOCK})")


def applied_migrations(engine: Engine) -> list[str]:
    """Names of the migrations already applied to the database."""
    with engine.begin() as connection:
        if not engine.dialect.has_table(connection, MIGRATIONS_TABLE):
            return []
        return sorted(connection.execute(select(_applied.c.name)).scalars())


def migrate(engine: Engine, *, up_to: str | None = None) -> list[str]:
    """Apply every migration not yet applied (or those up to and including ``up_to``).

    Returns:
        The names applied by this call.
    """
    with engine.begin() as connection:
        lock_registry(connection)
        _applied.create(connection, checkfirst=True)  # the bookkeeping table itself, nothing else
    done = []
    for name in migration_names():
        with engine.begin() as connection:
            lock_registry(connection)
            already = connection.execute(select(_applied.c.name).where(_applied.c.name == name)).first()
            if already is None:
                importlib.import_module(f"skillhub._registry.{name}").upgrade(connection)
                connection.execute(_applied.insert().values(
                    name=name, applied_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")))
                done.append(name)
        if name == up_to:
            break
    return done
