"""Migrations build exactly the schema of skillhub/tables.py, and upgrade old registries with their rows."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import SQLModel

import skillhub.registry.tables  # noqa: F401 - registers the table classes on SQLModel.metadata
from skillhub.registry.migrations import MIGRATIONS_TABLE, applied_migrations, migration_names
from skillhub.registry.front import Registry

STORED = Path(__file__).parent / "data" / "registry-m0001.db"


def _describe(columns, foreign_keys, indexes, uniques, primary_key) -> dict:
    return {
        "columns": {c["name"]: (type(c["type"]).__name__, bool(c["nullable"])) for c in columns},
        "primary_key": sorted(primary_key),
        "foreign_keys": sorted((tuple(fk["constrained_columns"]), fk["referred_table"], tuple(fk["referred_columns"]))
                               for fk in foreign_keys),
        "indexes": sorted((i["name"], tuple(i["column_names"])) for i in indexes if not i.get("unique")),
        "uniques": sorted({tuple(u) for u in uniques}),
    }


def _schema_of_database(engine: sa.Engine) -> dict:
    inspector = sa.inspect(engine)
    schema = {}
    for table in inspector.get_table_names():
        if table == MIGRATIONS_TABLE:
            continue
        uniques = [tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)]
        uniques += [tuple(i["column_names"]) for i in inspector.get_indexes(table) if i.get("unique")]
        schema[table] = _describe(inspector.get_columns(table), inspector.get_foreign_keys(table),
                                  inspector.get_indexes(table), uniques,
                                  inspector.get_pk_constraint(table)["constrained_columns"])
    return schema


def _schema_of_classes() -> dict:
    schema = {}
    for table in SQLModel.metadata.sorted_tables:
        columns = [{"name": c.name, "type": c.type, "nullable": c.nullable and not c.primary_key}
                   for c in table.columns]
        foreign_keys = [{"constrained_columns": [fk.parent.name], "referred_table": fk.column.table.name,
                         "referred_columns": [fk.column.name]} for fk in table.foreign_keys]
        indexes = [{"name": i.name, "column_names": [c.name for c in i.columns], "unique": i.unique}
                   for i in table.indexes]
        uniques = [tuple(c.name for c in u.columns) for u in table.constraints if isinstance(u, sa.UniqueConstraint)]
        uniques += [(c.name,) for c in table.columns if c.unique]
        schema[table.name] = _describe(columns, foreign_keys, indexes, uniques, [c.name for c in table.primary_key])
    return schema


def _normalise(schema: dict) -> dict:
    # Type names differ by dialect reflection (VARCHAR vs String); compare type families.
    families = {"VARCHAR": "String", "String": "String", "TEXT": "Text", "Text": "Text", "INTEGER": "Integer",
                "Integer": "Integer", "FLOAT": "Float", "Float": "Float", "DOUBLE_PRECISION": "Float", "REAL": "Float",
                "BOOLEAN": "Boolean", "Boolean": "Boolean", "AutoString": "String", "_SQliteJson": "JSON",
                "BLOB": "Binary", "BYTEA": "Binary", "LargeBinary": "Binary"}
    for table in schema.values():
        table["columns"] = {name: (families.get(kind, kind), nullable) for name, (kind, nullable) in table["columns"].items()}
    return schema


def test_fresh_migrated_database_equals_the_sqlmodel_classes(registry_factory) -> None:
    registry = registry_factory()
    assert applied_migrations(registry.engine) == migration_names() == ["m0001_initial", "m0002_evaluation", "m0003_routing", "m0004_lm_eval", "m0005_prompt_format"]
    migrated = _normalise(_schema_of_database(registry.engine))
    declared = _normalise(_schema_of_classes())
    assert migrated == declared


def test_stored_first_version_registry_upgrades_with_its_rows(tmp_path: Path) -> None:
    directory = tmp_path / "old"
    directory.mkdir()
    shutil.copy(STORED, directory / "registry.db")
    engine = sa.create_engine(f"sqlite:///{directory / 'registry.db'}")
    assert applied_migrations(engine) == ["m0001_initial"]
    engine.dispose()

    registry = Registry(directory)
    assert applied_migrations(registry.engine) == migration_names()
    assert [(p.id, p.task) for p in registry.list_packs()] == [("0123456789ab", "math"), ("ba9876543210", "code")]
    assert [e.kind for e in registry.log()] == ["add", "add"]
    assert {t.name: t.packs for t in registry.tasks()} == {"math": ("0123456789ab",), "code": ("ba9876543210",)}
    with registry.engine.connect() as connection:
        columns = {c["name"] for c in sa.inspect(connection).get_columns("tasks")}
        tables = set(sa.inspect(connection).get_table_names())
    assert {"eval_path", "eval_sha256", "metric", "lm_eval"} <= columns
    assert {"routers", "routing_sets"} <= tables
    assert Registry(directory).list_packs() == registry.list_packs()  # opening again applies nothing twice


def test_migrations_are_never_applied_twice(tmp_path: Path) -> None:
    Registry(tmp_path / "r")
    registry = Registry(tmp_path / "r")
    with registry.engine.connect() as connection:
        rows = connection.execute(sa.text(f"SELECT name FROM {MIGRATIONS_TABLE}")).scalars().all()
    assert sorted(rows) == migration_names()


@pytest.mark.parametrize("name", ["m0001_initial", "m0002_evaluation", "m0003_routing", "m0004_lm_eval", "m0005_prompt_format"])
def test_migrations_ship_in_the_package(name: str) -> None:
    assert name in migration_names()
