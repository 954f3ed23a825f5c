"""A task's prompt format: ``{"format": "chat"|"plain"|null, "system": ...}`` as JSON (NULL: the
base tokenizer's default, which is what every task registered before this migration was scored with)."""

from sqlalchemy import text


def upgrade(connection) -> None:
    connection.execute(text("ALTER TABLE tasks ADD COLUMN prompt_format TEXT"))
