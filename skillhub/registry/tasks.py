"""Tasks of a base model: their activation sets S_t (paper Eq. 10) and their eval sets.

A task's set is, by default, the active packs whose task it is; ``task set`` makes it an
explicit list. An eval set is a file whose sha256 is kept, so a changed file is noticed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select
from sqlmodel import Session

from skillhub.errors import NotFoundError, RegistryError
from skillhub.pack.names import check_name
from skillhub.registry.database import Database, find_base, find_pack, log_event
from skillhub.registry.results import BaseEntry, EvalSet, TaskEval, TaskSet
from skillhub.registry.tables import BaseModelRow, PackRow, TaskPackRow, TaskRow


def ensure_task(session: Session, base: BaseModelRow, name: str) -> TaskRow:
    """The task ``name`` of ``base``, created if new (its name checked)."""
    check_name(name, "task")
    row = session.scalars(select(TaskRow).where(TaskRow.base_id == base.id, TaskRow.name == name)).first()
    if row is None:
        row = TaskRow(base_id=base.id, name=name, explicit=False)
        session.add(row)
        session.flush()
    return row


def task_sets(session: Session, base: BaseModelRow) -> list[TaskSet]:
    """Every task of ``base`` with its activation set (pack ids in lineage order)."""
    active = list(session.scalars(
        select(PackRow).where(PackRow.base_id == base.id, PackRow.state == "active").order_by(PackRow.position)))
    members: dict[int, set[str]] = {}
    for link in session.scalars(select(TaskPackRow)):
        members.setdefault(link.task_id, set()).add(link.pack_id)
    tasks = []
    for task in session.scalars(select(TaskRow).where(TaskRow.base_id == base.id).order_by(TaskRow.name)):
        chosen = members.get(task.id, set()) if task.explicit else {p.id for p in active if p.task == task.name}
        tasks.append(TaskSet(name=task.name, explicit=task.explicit, packs=tuple(p.id for p in active if p.id in chosen)))
    return tasks


def replace_task_set(session: Session, base_row: BaseModelRow, task: str, packs: Sequence[PackRow]) -> None:
    """Make the activation set of ``task`` exactly ``packs`` (active packs of ``base_row``)."""
    for pack in packs:
        if pack.state != "active" or pack.base_id != base_row.id:
            raise RegistryError(f"pack {pack.id} is not an active pack of base {base_row.name}")
    row = ensure_task(session, base_row, task)
    row.explicit = True
    for link in session.scalars(select(TaskPackRow).where(TaskPackRow.task_id == row.id)):
        session.delete(link)
    session.flush()
    for pack in packs:
        session.add(TaskPackRow(task_id=row.id, pack_id=pack.id))
    log_event(session, base_row, "task-set", task=task, packs=[p.id for p in packs])


def set_task(db: Database, task: str, pack_ids: Sequence[str], *, base: str | None) -> TaskSet:
    """See :meth:`skillhub.registry.Registry.set_task`."""
    with db.session(write=True) as session:
        base_row = find_base(session, base)
        replace_task_set(session, base_row, task, [find_pack(session, p) for p in pack_ids])
        return next(t for t in task_sets(session, base_row) if t.name == task)


def activation_rows(db: Database, *, task: str | None, packs: Sequence[str] | None,
                    base: str | None) -> tuple[BaseEntry, list[str]]:
    """The base entry and the store addresses of S_t (or of an explicit list), in lineage order."""
    if (task is None) == (packs is None):
        raise RegistryError("give exactly one of a task or a list of packs")
    with db.session() as session:
        base_row = find_base(session, base)
        if task is not None:
            sets = task_sets(session, base_row)
            found = next((t for t in sets if t.name == task), None)
            if found is None:
                raise NotFoundError("task", task, known=[t.name for t in sets], where=f"for base {base_row.name}")
            ids = found.packs
        else:
            ids = [find_pack(session, p).id for p in packs]
        rows = sorted((find_pack(session, i) for i in ids), key=lambda r: r.position)
        for row in rows:
            if row.state != "active" or row.base_id != base_row.id:
                raise RegistryError(f"pack {row.id} is not an active pack of base {base_row.name}")
        return BaseEntry(base_row.name, base_row.location, base_row.fingerprint), [r.sha256 for r in rows]


def add_eval_set(db: Database, name: str, eval_path: str | os.PathLike[str], *, metric: str,
                 base: str | None) -> TaskEval:
    """See :meth:`skillhub.registry.Registry.add_task`."""
    from skillhub.evaluation.datasets import load_eval_set
    from skillhub.pack.format import sha256_file

    path = Path(eval_path).resolve()
    load_eval_set(path, metric)  # refuse a bad file before touching the database
    digest = sha256_file(path)
    with db.session(write=True) as session:
        base_row = find_base(session, base)
        row = ensure_task(session, base_row, name)
        row.eval_path, row.eval_sha256, row.metric = str(path), digest, metric
        event = log_event(session, base_row, "task-add", task=name, eval=str(path), sha256=digest, metric=metric)
        session.flush()
        return TaskEval(name=name, eval=str(path), sha256=digest, metric=metric, event=event.id)


def eval_sets(db: Database, *, base: str | None, task: str | None) -> list[EvalSet]:
    """See :meth:`skillhub.registry.Registry.eval_sets`."""
    from skillhub.pack.format import sha256_file

    with db.session() as session:
        base_row = find_base(session, base)
        rows = list(session.scalars(select(TaskRow).where(TaskRow.base_id == base_row.id,
                                                          TaskRow.eval_path.is_not(None)).order_by(TaskRow.id)))
    if task is not None:
        rows = [r for r in rows if r.name == task]
        if not rows:
            raise NotFoundError("task", task, where="with an eval set")
    sets = []
    for row in rows:
        path = Path(row.eval_path)
        if not path.is_file() or sha256_file(path) != row.eval_sha256:
            raise RegistryError(
                f"the eval file of task {row.name} ({path}) changed or vanished since it was added; "
                f"register it again with `skillhub task add {row.name} --eval FILE`"
            )
        sets.append(EvalSet(name=row.name, path=path, metric=row.metric))
    return sets
