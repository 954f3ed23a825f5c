"""What registry operations return: frozen dataclasses, turned into JSON in one place
(:func:`as_json`) for the command line and for scripts.

``Result.as_dict()`` gives the JSON-ready form (paths as strings, nested results expanded);
the field names are the keys of ``skillhub ... --json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skillhub.scoring.prompts import PromptFormat


@dataclass(frozen=True)
class Result:
    """Base of every result; :meth:`as_dict` is its JSON form."""

    def as_dict(self) -> dict[str, Any]:
        # The instance dict holds the fields in declaration order (no __slots__); listings build
        # this for every pack, so it skips dataclasses.fields().
        return {name: as_json(value) for name, value in vars(self).items()}


_PLAIN = (str, int, float, bool, type(None))


def as_json(value: Any) -> Any:
    """``value`` with every result, path and tuple turned into JSON types (recursively)."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, Result):
        return value.as_dict()
    if isinstance(value, dict):
        return {key: as_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_json(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, PromptFormat):
        return value.as_json()
    return value


@dataclass(frozen=True)
class PackEntry(Result):
    """A pack in the registry."""

    id: str
    name: str
    task: str
    version: str
    sha256: str
    bytes: int
    ratio: float
    parent: str | None
    state: str  # "active" or "removed"
    purged: bool
    position: int
    added_at: str
    base: str


@dataclass(frozen=True)
class AddedPack(PackEntry):
    """A pack just added, with the lineage event that added it."""

    event: int


@dataclass(frozen=True)
class PackDetails(PackEntry):
    """One pack with its manifest, the tasks whose activation set holds it, and where it is stored."""

    manifest: dict[str, Any]
    in_tasks: tuple[str, ...]
    path: str | None


@dataclass(frozen=True)
class Event(Result):
    """One step of a lineage's event log."""

    id: int
    base: str
    kind: str  # base, add, remove, purge, task-set, task-add, eval
    pack: str | None
    task: str | None
    detail: dict[str, Any]
    actor: str
    at: str


@dataclass(frozen=True)
class TaskSet(Result):
    """A task and its activation set S_t (pack ids in lineage order)."""

    name: str
    explicit: bool
    packs: tuple[str, ...]
    prompt_format: PromptFormat = PromptFormat()  # how its prompts are rendered (scoring, generate --task)


@dataclass(frozen=True)
class TaskEval(Result):
    """A task's registered eval set."""

    name: str
    eval: str
    sha256: str | None  # of the eval file, or of the lm-eval include folder (None: lm-eval's own task)
    metric: str
    event: int  # the lineage step of the task-add event: base scores taken now are filed under it
    lm_eval: dict[str, Any] | None = None  # task, include, limit, metric of an lm-eval task
    prompt_format: dict[str, Any] | None = None  # {"format", "system"}: how its prompts are rendered


@dataclass(frozen=True)
class DeclaredTask(Result):
    """A task given its eval set, with the base model's score on it taken then (none if not evaluated)."""

    task: TaskEval
    scores: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class EvalSet(Result):
    """An eval set checked against its recorded sha256, ready to score."""

    name: str
    path: Path | None  # None for an lm-eval task
    metric: str
    lm_eval: dict[str, Any] | None = None
    prompt_format: PromptFormat = PromptFormat()


@dataclass(frozen=True)
class EvalRecord(Result):
    """One score: a task under a policy (subset, fused, base) at a lineage step."""

    step: int
    event: str
    event_task: str | None
    task: str
    policy: str
    metric: str
    score: float


@dataclass(frozen=True)
class BaseEntry(Result):
    """A registered base model: where its weights are and their fingerprint."""

    name: str
    location: str
    fingerprint: str


@dataclass(frozen=True)
class RegisteredBase(BaseEntry):
    """A base model registered before any pack (``init --base``); ``created`` is False when
    these weights were registered already."""

    revision: str | None
    architecture: str | None
    created: bool


@dataclass(frozen=True)
class DoctorReport(Result):
    """What ``doctor`` found and, with ``repair``, did."""

    consistent: bool
    checked: int
    problems: tuple[dict[str, str], ...] = ()
    orphans: tuple[str, ...] = ()
    leftovers: tuple[str, ...] = ()
    repaired: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()


@dataclass(frozen=True)
class Scored(Result):
    """A pack added and every task scored right after (one continual-learning step)."""

    entry: AddedPack
    scores: tuple[dict[str, Any], ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        # The pack's entry with its scores beside it: what `skillhub add --json` prints.
        return {**self.entry.as_dict(), "scores": as_json(self.scores)}


@dataclass(frozen=True)
class StoredRouter(Result):
    """A base's current router as stored: its spec (JSON) and its arrays (safetensors bytes)."""

    base: str
    fingerprint: str
    location: str
    step: int
    spec: dict[str, Any]
    arrays: bytes
    created_at: str
