"""Tasks scored with lm-evaluation-harness: the task, include folder, limit and metric (JSON)."""

from sqlalchemy import text


def upgrade(connection) -> None:
    connection.execute(text("ALTER TABLE tasks ADD COLUMN lm_eval TEXT"))
