"""Evaluation records: scores of every task under each policy (own set, all packs, base),
each attached to the lineage step it was measured at."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from skillhub.registry.database import Database, find_base, log_event, now
from skillhub.registry.results import EvalRecord
from skillhub.registry.tables import EvalRecordRow, EventRow


def record_scores(db: Database, records: list[dict[str, Any]], *, base: str | None, step: int | None) -> int:
    """See :meth:`skillhub.registry.Registry.record_scores`."""
    with db.session(write=True) as session:
        base_row = find_base(session, base)
        if step is None:
            log_event(session, base_row, "eval", tasks=sorted({r["task"] for r in records}))
            session.flush()
            step = session.scalar(select(func.max(EventRow.id)))
        for record in records:
            session.add(EvalRecordRow(base_id=base_row.id, step=step, at=now(), **record))
        return step


def scores(db: Database, *, base: str | None) -> list[EvalRecord]:
    """Every evaluation record with the event it belongs to, oldest first."""
    with db.session() as session:
        base_row = find_base(session, base)
        query = (select(EvalRecordRow, EventRow).join(EventRow, EvalRecordRow.step == EventRow.id)
                 .where(EvalRecordRow.base_id == base_row.id).order_by(EvalRecordRow.step, EvalRecordRow.id))
        return [EvalRecord(step=r.step, event=e.kind, event_task=e.task, task=r.task, policy=r.policy,
                           metric=r.metric, score=r.score) for r, e in session.execute(query)]
