"""Base models, packs, tasks and their activation sets, and the lineage event log."""

from sqlalchemy import (
    Boolean, Column, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text, UniqueConstraint,
)


def upgrade(connection) -> None:
    metadata = MetaData()
    Table(
        "base_models", metadata,
        Column("id", Integer, primary_key=True),
        Column("name", String(256), nullable=False, unique=True),
        Column("location", Text, nullable=False),
        Column("revision", String(128)),
        Column("architecture", String(128)),
        Column("model_type", String(64)),
        Column("fingerprint", String(80), nullable=False, unique=True),
        Column("registered_at", String(32), nullable=False),
    )
    Table(
        "packs", metadata,
        Column("id", String(16), primary_key=True),
        Column("base_id", Integer, ForeignKey("base_models.id"), nullable=False),
        Column("name", String(128), nullable=False),
        Column("task", String(128), nullable=False),
        Column("version", String(64), nullable=False),
        Column("sha256", String(64), nullable=False, unique=True),
        Column("bytes", Integer, nullable=False),
        Column("ratio", Float, nullable=False),
        Column("parent_id", String(16), ForeignKey("packs.id")),
        Column("state", String(16), nullable=False),
        Column("purged", Boolean, nullable=False),
        Column("position", Integer, nullable=False),
        Column("added_at", String(32), nullable=False),
        Column("manifest", Text, nullable=False),
        Index("ix_packs_base_task", "base_id", "task"),
    )
    Table(
        "tasks", metadata,
        Column("id", Integer, primary_key=True),
        Column("base_id", Integer, ForeignKey("base_models.id"), nullable=False),
        Column("name", String(128), nullable=False),
        Column("explicit", Boolean, nullable=False),
        UniqueConstraint("base_id", "name", name="uq_tasks_base_name"),
    )
    Table(
        "task_packs", metadata,
        Column("task_id", Integer, ForeignKey("tasks.id"), primary_key=True),
        Column("pack_id", String(16), ForeignKey("packs.id"), primary_key=True),
    )
    Table(
        "events", metadata,
        Column("id", Integer, primary_key=True),
        Column("base_id", Integer, ForeignKey("base_models.id"), nullable=False),
        Column("kind", String(32), nullable=False),
        Column("pack_id", String(16)),
        Column("task", String(128)),
        Column("detail", Text, nullable=False),
        Column("actor", String(256), nullable=False),
        Column("at", String(32), nullable=False),
        Index("ix_events_base", "base_id", "id"),
    )
    metadata.create_all(connection)
