"""Routers (trained per base model, stored as JSON + safetensors arrays) and routing example sets."""

from sqlalchemy import Column, ForeignKey, Integer, LargeBinary, MetaData, String, Table, Text, UniqueConstraint


def upgrade(connection) -> None:
    metadata = MetaData()
    Table("base_models", metadata, Column("id", Integer, primary_key=True))
    Table("events", metadata, Column("id", Integer, primary_key=True))
    Table(
        "routers", metadata,
        Column("id", Integer, primary_key=True),
        Column("base_id", Integer, ForeignKey("base_models.id"), nullable=False),
        Column("step", Integer, ForeignKey("events.id"), nullable=False),
        Column("spec", Text, nullable=False),
        Column("arrays", LargeBinary, nullable=False),
        Column("created_at", String(32), nullable=False),
    )
    Table(
        "routing_sets", metadata,
        Column("id", Integer, primary_key=True),
        Column("base_id", Integer, ForeignKey("base_models.id"), nullable=False),
        Column("name", String(128), nullable=False),
        Column("path", Text, nullable=False),
        Column("sha256", String(64), nullable=False),
        UniqueConstraint("base_id", "name", name="uq_routing_sets_base_name"),
    )
    metadata.tables["routers"].create(connection)
    metadata.tables["routing_sets"].create(connection)
