"""The registry's tables, as sqlmodel classes: the schema the migrations in ``registry/`` must build.

Only the registry modules import this. The database is never created from these classes at
runtime (migrations do that); a test checks that a freshly migrated database equals them.
Times are ISO-8601 UTC strings, so SQLite and PostgreSQL store them the same way.
"""

from __future__ import annotations

from sqlalchemy import Column, ForeignKey, Index, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


class BaseModelRow(SQLModel, table=True):
    """A base model that packs are deltas against, identified by its weights' fingerprint."""

    __tablename__ = "base_models"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_column=Column(String(256), nullable=False, unique=True))
    location: str = Field(sa_column=Column(Text, nullable=False))  # local path or Hub id used to load it
    revision: str | None = Field(default=None, sa_column=Column(String(128)))
    architecture: str | None = Field(default=None, sa_column=Column(String(128)))
    model_type: str | None = Field(default=None, sa_column=Column(String(64)))
    fingerprint: str = Field(sa_column=Column(String(80), nullable=False, unique=True))
    registered_at: str = Field(sa_column=Column(String(32), nullable=False))


class PackRow(SQLModel, table=True):
    """A SkillPack in the registry; its files live in the blob store under ``sha256``."""

    __tablename__ = "packs"
    __table_args__ = (Index("ix_packs_base_task", "base_id", "task"),)

    id: str = Field(sa_column=Column(String(16), primary_key=True))  # first 12 hex digits of sha256
    base_id: int = Field(sa_column=Column(Integer, ForeignKey("base_models.id"), nullable=False))
    name: str = Field(sa_column=Column(String(128), nullable=False))
    task: str = Field(sa_column=Column(String(128), nullable=False))
    version: str = Field(sa_column=Column(String(64), nullable=False))
    sha256: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    bytes: int = Field(sa_column=Column(Integer, nullable=False))
    ratio: float
    parent_id: str | None = Field(default=None, sa_column=Column(String(16), ForeignKey("packs.id")))
    state: str = Field(sa_column=Column(String(16), nullable=False))  # active | removed
    purged: bool = False
    position: int = Field(sa_column=Column(Integer, nullable=False))  # order of addition: the order of Eq. 10's sum
    added_at: str = Field(sa_column=Column(String(32), nullable=False))
    manifest: str = Field(sa_column=Column(Text, nullable=False))


class TaskRow(SQLModel, table=True):
    """A task of a base model; ``explicit`` marks an activation set chosen with ``task set``."""

    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("base_id", "name", name="uq_tasks_base_name"),)

    id: int | None = Field(default=None, primary_key=True)
    base_id: int = Field(sa_column=Column(Integer, ForeignKey("base_models.id"), nullable=False))
    name: str = Field(sa_column=Column(String(128), nullable=False))
    explicit: bool = False
    eval_path: str | None = Field(default=None, sa_column=Column(Text))
    eval_sha256: str | None = Field(default=None, sa_column=Column(String(64)))
    metric: str | None = Field(default=None, sa_column=Column(String(32)))
    lm_eval: str | None = Field(default=None, sa_column=Column(Text))  # JSON of an lm-eval task (then no eval_path)
    prompt_format: str | None = Field(default=None, sa_column=Column(Text))  # JSON of a PromptFormat (NULL: default)


class TaskPackRow(SQLModel, table=True):
    """Membership of a pack in a task's explicit activation set S_t."""

    __tablename__ = "task_packs"

    task_id: int = Field(sa_column=Column(Integer, ForeignKey("tasks.id"), primary_key=True))
    pack_id: str = Field(sa_column=Column(String(16), ForeignKey("packs.id"), primary_key=True))


class EventRow(SQLModel, table=True):
    """One entry of a base model's append-only lineage log."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_base", "base_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    base_id: int = Field(sa_column=Column(Integer, ForeignKey("base_models.id"), nullable=False))
    kind: str = Field(sa_column=Column(String(32), nullable=False))  # add | remove | purge | task-set | base | route-train | ...
    pack_id: str | None = Field(default=None, sa_column=Column(String(16)))
    task: str | None = Field(default=None, sa_column=Column(String(128)))
    detail: str = Field(sa_column=Column(Text, nullable=False))  # JSON
    actor: str = Field(sa_column=Column(String(256), nullable=False))
    at: str = Field(sa_column=Column(String(32), nullable=False))


class EvalRecordRow(SQLModel, table=True):
    """A task's score at a lineage step under one activation policy (for the forgetting metrics)."""

    __tablename__ = "eval_records"
    __table_args__ = (Index("ix_eval_records_step", "base_id", "step"),)

    id: int | None = Field(default=None, primary_key=True)
    base_id: int = Field(sa_column=Column(Integer, ForeignKey("base_models.id"), nullable=False))
    step: int = Field(sa_column=Column(Integer, ForeignKey("events.id"), nullable=False))
    task: str = Field(sa_column=Column(String(128), nullable=False))
    policy: str = Field(sa_column=Column(String(16), nullable=False))  # subset | fused | base | routed | a merge method
    metric: str = Field(sa_column=Column(String(32), nullable=False))
    score: float
    at: str = Field(sa_column=Column(String(32), nullable=False))


class RouterRow(SQLModel, table=True):
    """A router trained for a base model: its spec (JSON) and its arrays (safetensors bytes).
    The latest row of a base is its router; ``step`` is the lineage event that trained it."""

    __tablename__ = "routers"

    id: int | None = Field(default=None, primary_key=True)
    base_id: int = Field(sa_column=Column(Integer, ForeignKey("base_models.id"), nullable=False))
    step: int = Field(sa_column=Column(Integer, ForeignKey("events.id"), nullable=False))
    spec: str = Field(sa_column=Column(Text, nullable=False))
    arrays: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: str = Field(sa_column=Column(String(32), nullable=False))


class RoutingSetRow(SQLModel, table=True):
    """A file of routing examples for one class of a base's router (a task, or ``@base``)."""

    __tablename__ = "routing_sets"
    __table_args__ = (UniqueConstraint("base_id", "name", name="uq_routing_sets_base_name"),)

    id: int | None = Field(default=None, primary_key=True)
    base_id: int = Field(sa_column=Column(Integer, ForeignKey("base_models.id"), nullable=False))
    name: str = Field(sa_column=Column(String(128), nullable=False))
    path: str = Field(sa_column=Column(Text, nullable=False))
    sha256: str = Field(sa_column=Column(String(64), nullable=False))
