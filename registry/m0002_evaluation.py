"""Task eval sets (file, sha256, metric) and evaluation records per lineage step."""

from sqlalchemy import Column, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text, text


def upgrade(connection) -> None:
    for column, kind in (("eval_path", "TEXT"), ("eval_sha256", "VARCHAR(64)"), ("metric", "VARCHAR(32)")):
        connection.execute(text(f"ALTER TABLE tasks ADD COLUMN {column} {kind}"))
    metadata = MetaData()
    Table("base_models", metadata, Column("id", Integer, primary_key=True))
    Table("events", metadata, Column("id", Integer, primary_key=True))
    Table(
        "eval_records", metadata,
        Column("id", Integer, primary_key=True),
        Column("base_id", Integer, ForeignKey("base_models.id"), nullable=False),
        Column("step", Integer, ForeignKey("events.id"), nullable=False),
        Column("task", String(128), nullable=False),
        Column("policy", String(16), nullable=False),
        Column("metric", String(32), nullable=False),
        Column("score", Float, nullable=False),
        Column("at", String(32), nullable=False),
        Index("ix_eval_records_step", "base_id", "step"),
    )
    metadata.tables["eval_records"].create(connection)
