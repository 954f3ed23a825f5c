"""Tasks of a base model: their activation sets S_t (paper Eq. 10) and their eval sets.

A task's set is, by default, the active packs whose task it is; ``task set`` makes it an
explicit list. An eval set is a file whose sha256 is kept, so a changed file is noticed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import or_, select
from sqlmodel import Session

from skillhub.errors import NotFoundError, RegistryError
from skillhub.pack.names import check_name
from skillhub.registry.database import Database, find_base, find_pack, log_event
from skillhub.registry.results import BaseEntry, EvalSet, TaskEval, TaskSet
from skillhub.registry.tables import BaseModelRow, PackRow, TaskPackRow, TaskRow
from skillhub.scoring.prompts import PromptFormat

if TYPE_CHECKING:
    from skillhub.scoring.harness import HarnessTask


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
    # Ids and tasks only, grouped once: a 10,000-task registry must not compare every task with every pack.
    active = session.execute(select(PackRow.id, PackRow.task).where(
        PackRow.base_id == base.id, PackRow.state == "active").order_by(PackRow.position)).all()
    position = {pack_id: n for n, (pack_id, _) in enumerate(active)}
    by_task: dict[str, list[str]] = {}
    for pack_id, task_name in active:
        by_task.setdefault(task_name, []).append(pack_id)
    members: dict[int, set[str]] = {}
    for link in session.scalars(select(TaskPackRow)):
        members.setdefault(link.task_id, set()).add(link.pack_id)
    tasks = []
    for task in session.scalars(select(TaskRow).where(TaskRow.base_id == base.id).order_by(TaskRow.name)):
        if task.explicit:
            packs = tuple(sorted((i for i in members.get(task.id, ()) if i in position), key=position.__getitem__))
        else:
            packs = tuple(by_task.get(task.name, ()))
        tasks.append(TaskSet(name=task.name, explicit=task.explicit, packs=packs, prompt_format=_prompt_format(task)))
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


def add_eval_set(db: Database, name: str, eval_path: str | os.PathLike[str] | None, *, metric: str | None,
                 lm_eval: HarnessTask | None, base: str | None,
                 prompt_format: PromptFormat = PromptFormat()) -> TaskEval:
    """See :meth:`skillhub.registry.Registry.add_task`."""
    from skillhub.scoring.datasets import load_eval_set
    from skillhub.scoring.harness import include_digest, resolve
    from skillhub.pack.format import sha256_file

    if (eval_path is None) == (lm_eval is None):
        raise RegistryError("give a task either an eval file or an lm-eval task")
    if lm_eval is not None:  # refuse an unknown task or metric before touching the database
        lm_eval = resolve(lm_eval.task, include=lm_eval.include, limit=lm_eval.limit, metric=metric or lm_eval.metric)
        where, digest, metric, spec = None, include_digest(lm_eval.include), lm_eval.recorded_metric, lm_eval.as_json()
    else:
        path = Path(eval_path).resolve()
        metric = metric or "exact_match"
        load_eval_set(path, metric)  # refuse a bad file before touching the database
        where, digest, spec = str(path), sha256_file(path), None
    with db.session(write=True) as session:
        base_row = find_base(session, base)
        row = ensure_task(session, base_row, name)
        row.eval_path, row.eval_sha256, row.metric = where, digest, metric
        row.lm_eval = json.dumps(spec) if spec else None
        row.prompt_format = None if prompt_format == PromptFormat() else json.dumps(prompt_format.as_json())
        shown = prompt_format.as_json()
        event = log_event(session, base_row, "task-add", task=name, eval=where, sha256=digest, metric=metric,
                          prompt_format=shown, **({"lm_eval": spec} if spec else {}))
        session.flush()
        return TaskEval(name=name, eval=where or f"lm-eval {lm_eval.task}", sha256=digest, metric=metric,
                        event=event.id, lm_eval=spec, prompt_format=shown)


def eval_sets(db: Database, *, base: str | None, task: str | None) -> list[EvalSet]:
    """See :meth:`skillhub.registry.Registry.eval_sets`."""
    from skillhub.scoring.harness import include_digest
    from skillhub.pack.format import sha256_file

    with db.session() as session:
        base_row = find_base(session, base)
        rows = list(session.scalars(select(TaskRow).where(
            TaskRow.base_id == base_row.id, or_(TaskRow.eval_path.is_not(None), TaskRow.lm_eval.is_not(None))
        ).order_by(TaskRow.id)))
    if task is not None:
        rows = [r for r in rows if r.name == task]
        if not rows:
            raise NotFoundError("task", task, where="with an eval set")
    sets = []
    for row in rows:
        spec = json.loads(row.lm_eval) if row.lm_eval else None
        path = Path(row.eval_path) if row.eval_path else None
        if spec is not None:
            changed = include_digest(spec["include"]) != row.eval_sha256 if spec["include"] else False
            what = f"the lm-eval task folder of task {row.name} ({spec['include']})"
        else:
            changed = not path.is_file() or sha256_file(path) != row.eval_sha256
            what = f"the eval file of task {row.name} ({path})"
        if changed:
            raise RegistryError(f"{what} changed or vanished since it was added; register it again with "
                                f"`skillhub task add {row.name} ...`")
        sets.append(EvalSet(name=row.name, path=path, metric=row.metric, lm_eval=spec, prompt_format=_prompt_format(row)))
    return sets


def _prompt_format(row: TaskRow) -> PromptFormat:
    return PromptFormat.from_json(json.loads(row.prompt_format) if row.prompt_format else None)
