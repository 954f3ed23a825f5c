"""The registry: per base model, the lineage of SkillPacks, task activation sets, evaluation
records, unlearning by removal.

:class:`Registry` is the front. Each public method hands its work to the module that owns the
concept: :mod:`~skillhub.registry.database` (engines, sessions, lookups), :mod:`~skillhub.registry.lineage`
(add, remove, list, log), :mod:`~skillhub.registry.tasks` (activation and eval sets),
:mod:`~skillhub.registry.evals` (scores), :mod:`~skillhub.registry.doctor` (consistency), and
:mod:`skillhub.activation` (the weights). Pack files live in a content-addressed
:class:`~skillhub.registry.store.PackStore`.

Activation (paper Eq. 10) always starts from the pristine base: theta_t = theta_base + sum of
the packs in S_t, summed in the order they were added, so removing a pack yields exactly the
weights of a registry that never had it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any


from skillhub import config
from skillhub.errors import RegistryError
from skillhub.progress import ProgressCallback, no_progress
from skillhub.registry import doctor as doctor_checks
from skillhub.registry import evals, lineage, routing
from skillhub.registry import tasks as task_store
from skillhub.registry.database import STORE_DIR, Database, display
from skillhub.registry.results import (
    AddedPack,
    BaseEntry,
    DoctorReport,
    EvalRecord,
    EvalSet,
    Event,
    PackDetails,
    PackEntry,
    RegisteredBase,
    StoredRouter,
    TaskEval,
    TaskSet,
)
from skillhub.registry.store import PackStore
from skillhub.scoring.prompts import PromptFormat, Renderer

if TYPE_CHECKING:  # torch and the pack machinery load only for commands that touch weights
    import torch

    from skillhub.activation import Merge
    from skillhub.scoring.harness import HarnessTask
    from skillhub.pack.manifest import BaseRef

    from skillhub.pack.format import SkillPack


class Registry:
    """A SkillPack registry.

    A registry the process may not write (a read-only directory), or one upgraded by a newer
    skillhub, opens for reading: listings, ``show``, ``log`` and ``doctor`` work, and every
    write raises :class:`~skillhub.errors.ReadOnlyRegistryError` with the reason.

    Args:
        location: A registry directory, or an SQLAlchemy URL for the metadata
            (default: ``$SKILLHUB_HOME``, else the platform user data dir).
        store: Directory of pack files (default: ``<location>/packs``, or ``<home>/packs`` for a URL).

    Raises:
        RegistryError: The directory or database cannot be opened, or needs an upgrade it may not get.
    """

    def __init__(self, location: str | os.PathLike[str] | None = None, *, store: str | os.PathLike[str] | None = None):
        where = str(location) if location is not None else str(config.home())
        self.db = Database(where)
        default_store = config.home() / STORE_DIR if "://" in where else Path(where) / STORE_DIR
        self.store = PackStore(Path(store) if store else default_store)

    @property
    def engine(self):
        """The SQLAlchemy engine of the metadata database."""
        return self.db.engine

    @property
    def url(self) -> str:
        """The registry directory, or the database URL."""
        return self.db.url

    @property
    def display_url(self) -> str:
        """Where the registry is, fit to print: a database URL without its password."""
        return display(self.url)

    @property
    def read_only(self) -> str | None:
        """Why writes are refused, or None if they are allowed."""
        return self.db.read_only

    # ------------------------------------------------------------------ the lineage

    def add(self, pack: str | os.PathLike[str] | SkillPack, *, task: str | None = None, base: str | None = None,
            new_base: bool = False, base_location: str | None = None) -> AddedPack:
        """Add a pack (verified, decoded once, stored by content) to the lineage of its base model.

        Args:
            pack: A pack directory or an opened pack.
            task: The task it teaches (default: the task in its manifest).
            base: Name of the registered base it must belong to (default: found by fingerprint).
            new_base: Register the pack's base model if the registry does not know it yet,
                even though other bases are registered.
            base_location: Where the base's weights are (local dir or Hub id) for later activation
                (default: the base id recorded in the pack).

        Returns:
            The pack's registry entry.

        Raises:
            MismatchError: The pack was made for a base other than the registered one.
            PackError: The pack is corrupt, fails its schema, or does not decode to finite deltas.
        """
        return self.add_lineage([pack], tasks=[task], base=base, new_base=new_base, base_location=base_location)[0]

    def add_lineage(self, packs: Sequence[str | os.PathLike[str] | SkillPack], *,
                    tasks: Sequence[str | None] | None = None, task_sets: Mapping[str, Sequence[str]] | None = None,
                    base: str | None = None, new_base: bool = False, base_location: str | None = None,
                    adopt: bool = False) -> list[AddedPack]:
        """Add packs of one base model in lineage order, all or none (one transaction).

        Args:
            packs: Pack directories or opened packs, oldest first.
            tasks: The task of each pack (None: the task in its manifest).
            task_sets: Explicit activation sets to set: task -> sha256 addresses of its packs
                (packs of this call or ones already registered).
            base: As :meth:`add`.
            new_base: As :meth:`add`.
            base_location: As :meth:`add`.
            adopt: The pack directories are temporary copies under the store's incoming
                directory: move them into the store instead of copying.

        Returns:
            The packs' registry entries, in order; each names the lineage event that added it.

        Raises:
            MismatchError: The packs were made for a base other than the registered one.
            RegistryError: A pack is already active in the registry.
        """
        from skillhub.pack.format import SkillPack, load_pack

        self.db.require_writable()
        opened = [p if isinstance(p, SkillPack) else load_pack(p) for p in packs]
        return lineage.add_lineage(self.db, self.store, opened, tasks=list(tasks or [None] * len(opened)),
                                   task_sets_by_sha=task_sets or {}, base=base, new_base=new_base,
                                   base_location=base_location, adopt=adopt)

    def register_base(self, location: str | os.PathLike[str], *, revision: str | None = None,
                      name: str | None = None) -> RegisteredBase:
        """Register a base model before any pack, so tasks can be declared (and the base scored on
        them) before the first addition: the accuracy matrices are then complete from step one.

        Reads every weight once for the fingerprint. Registering the same weights again returns
        the existing entry (``created`` False).

        Args:
            location: A local model directory or a Hub id; kept (absolute, for a directory) to load it later.
            revision: Branch, tag or commit, for a Hub id.
            name: The base's name (default: derived from its id, as when a pack registers it).

        Raises:
            CheckpointError: ``location`` is not a usable model.
            MismatchError: ``name`` is taken by other weights.
        """
        from skillhub.io.checkpoint import open_checkpoint
        from skillhub.pack.manifest import BaseRef
        from skillhub.pack.names import check_name

        self.db.require_writable()
        if name is not None:
            check_name(name, "base")
        checkpoint = open_checkpoint(location, revision=revision)
        where = str(Path(location).resolve()) if Path(location).is_dir() else str(location)
        return lineage.register_base(self.db, BaseRef.of(checkpoint), name=name, location=where)

    def check_base(self, recorded: BaseRef, *, base: str | None = None, new_base: bool = False) -> None:
        """Check that a pack made for the base ``recorded`` (its manifest's ``base``) may be added.

        Raises:
            MismatchError: It was made for other weights than the registered base model.
        """
        lineage.registered_base(self.db, recorded, base=base, new_base=new_base)

    def remove(self, pack_id: str, *, purge: bool = False) -> PackEntry:
        """Unlearn a pack: drop it from the lineage's active packs and every activation set.

        With ``purge`` its files are deleted from the store as well.
        """
        return lineage.remove(self.db, self.store, pack_id, purge=purge)

    def list_packs(self, *, base: str | None = None, include_removed: bool = False) -> list[PackEntry]:
        """Packs in lineage order (oldest first)."""
        return lineage.list_packs(self.db, base=base, include_removed=include_removed)

    def show(self, pack_id: str) -> PackDetails:
        """One pack's entry, with its manifest and the tasks whose activation set holds it."""
        return lineage.show(self.db, self.store, pack_id)

    def manifests(self, pack_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The manifests of these full pack ids as recorded at add, keyed by id (a listing's details)."""
        return lineage.manifests(self.db, pack_ids)

    def log(self, *, base: str | None = None) -> list[Event]:
        """The lineage event log, oldest first."""
        return lineage.log(self.db, base=base)

    def bases(self) -> list[BaseEntry]:
        """Every registered base model (name, location, fingerprint), oldest first."""
        return lineage.bases(self.db)

    def last_event(self, *, base: str | None = None) -> int:
        """The id of the base's latest lineage event: one cheap query that tells a long-running reader
        (``serve``) whether anything changed since it last looked."""
        return lineage.last_event(self.db, base=base)

    # ------------------------------------------------------------------ tasks

    def tasks(self, *, base: str | None = None) -> list[TaskSet]:
        """Every task of a base with its activation set S_t (pack ids in lineage order)."""
        from skillhub.registry.database import find_base

        with self.db.session() as session:
            return task_store.task_sets(session, find_base(session, base))

    def set_task(self, task: str, pack_ids: Sequence[str], *, base: str | None = None) -> TaskSet:
        """Make S_t exactly ``pack_ids`` (an empty list: the base model alone)."""
        return task_store.set_task(self.db, task, pack_ids, base=base)

    def add_task(self, name: str, eval_path: str | os.PathLike[str] | None = None, *, metric: str | None = None,
                 lm_eval: HarnessTask | None = None, base: str | None = None,
                 prompt_format: PromptFormat = PromptFormat()) -> TaskEval:
        """Give task ``name`` an eval set: a file (its sha256 is kept, so a changed file is noticed;
        ``metric`` exact_match, the default, or perplexity), or an lm-evaluation-harness task
        (``lm_eval``; its metric defaults to the task's first, and its include folder is hashed).
        ``prompt_format`` says how its prompts are rendered (default: the base tokenizer's chat
        template when it has one, else plain); a chat format is checked against the base's tokenizer.

        Raises:
            SkillhubError: The eval file is unusable for ``metric``, lm-eval has no such task or
                metric, or the base's tokenizer cannot render the format (nothing is recorded then).
        """
        if prompt_format.kind == "chat" or prompt_format.system is not None:
            Renderer(self.load_base_tokenizer(base=base), prompt_format, what=f"the base of task {name}")
        return task_store.add_eval_set(self.db, name, eval_path, metric=metric, lm_eval=lm_eval, base=base,
                                       prompt_format=prompt_format)

    def eval_sets(self, *, base: str | None = None, task: str | None = None) -> list[EvalSet]:
        """Tasks with an eval set, checked against the sha256 recorded when they were added.

        Raises:
            NotFoundError: ``task`` does not exist or has no eval set.
            RegistryError: An eval file changed or vanished since ``task add``.
        """
        return task_store.eval_sets(self.db, base=base, task=task)

    # ------------------------------------------------------------------ evaluation records

    def record_scores(self, records: list[dict[str, Any]], *, base: str | None = None, step: int | None = None) -> int:
        """Store evaluation records at lineage step ``step`` (default: a new ``eval`` event); returns the step."""
        return evals.record_scores(self.db, records, base=base, step=step)

    def scores(self, *, base: str | None = None) -> list[EvalRecord]:
        """Every evaluation record with the event it belongs to, oldest first."""
        return evals.scores(self.db, base=base)

    # ------------------------------------------------------------------ routing

    def save_router(self, spec: dict[str, Any], arrays: bytes, *, base: str | None = None) -> int:
        """Store a trained router (see :mod:`skillhub.routing`) as the base's current one; returns
        the lineage step that trained it."""
        return routing.save_router(self.db, spec, arrays, base=base)

    def stored_router(self, *, base: str | None = None) -> StoredRouter | None:
        """The base's current router as stored, or None if none was trained."""
        return routing.load_router(self.db, base=base)

    def add_routing_examples(self, name: str, path: str | os.PathLike[str], *, base: str | None = None) -> EvalSet:
        """Give task ``name`` (or ``@base``: prompts no pack should answer) a JSONL file of routing
        examples (``{"prompt"}``, with ``"answer"`` for loss labels)."""
        return routing.add_routing_set(self.db, name, path, base=base)

    def routing_examples(self, *, base: str | None = None) -> list[EvalSet]:
        """The routing example files given with :meth:`add_routing_examples`, checked by sha256."""
        return routing.routing_sets(self.db, base=base)

    # ------------------------------------------------------------------ activation

    def activation_set(self, *, task: str | None = None, packs: Sequence[str] | None = None,
                       base: str | None = None) -> tuple[BaseEntry, list[SkillPack]]:
        """The base entry and the opened packs of S_t (or of an explicit list), in lineage order."""
        base_entry, addresses = task_store.activation_rows(self.db, task=task, packs=packs, base=base)
        return base_entry, [self.store.open(sha) for sha in addresses]

    def activation_ids(self, *, task: str | None = None, packs: Sequence[str] | None = None,
                       base: str | None = None) -> list[str]:
        """The full ids of the packs of S_t (or of an explicit list of id prefixes), in lineage order."""
        _, addresses = task_store.activation_rows(self.db, task=task, packs=packs, base=base)
        return [sha[:12] for sha in addresses]  # a pack's id is the start of its store address (lineage.py)

    def packs_by_id(self, ids: Sequence[str], *, base: str | None = None) -> dict[str, SkillPack]:
        """The opened packs of these full pack ids (active packs of the base), keyed by id."""
        _, addresses = task_store.activation_rows(self.db, task=None, packs=list(ids), base=base)
        return {sha[:12]: self.store.open(sha) for sha in addresses}

    def activate(self, output: str | os.PathLike[str], *, task: str | None = None, packs: Sequence[str] | None = None,
                 base: str | None = None, base_location: str | None = None, force: bool = False,
                 merge: Merge | None = None, progress: ProgressCallback = no_progress) -> Path:
        """Write theta_base + sum of S_t (or a ``merge`` of its packs) as a Hugging Face checkpoint
        directory (paper Eq. 10)."""
        from skillhub.activation import apply_packs

        base_entry, opened = self.activation_set(task=task, packs=packs, base=base)
        location = base_location or base_entry.location
        return apply_packs(location, opened, output, force=force, merge=merge, progress=progress,
                           protect=[location if Path(location).exists() else None, self.store.root,
                                    None if "://" in self.url else self.url])

    @contextmanager
    def activated(self, model: torch.nn.Module, *, task: str | None = None, packs: Sequence[str] | None = None,
                  base: str | None = None, verify: bool = True, merge: Merge | None = None) -> Iterator[torch.nn.Module]:
        """Patch a loaded ``transformers`` model with S_t in place; restore its exact bits on exit
        (see :func:`skillhub.activation.patched`).

        Raises:
            MismatchError: ``verify`` and the model's weights are not the registered base.
        """
        from skillhub.activation import check_model_is_base, patched

        base_entry, opened = self.activation_set(task=task, packs=packs, base=base)
        if verify:
            check_model_is_base(model, base_entry.fingerprint, base_entry.name)
        with patched(model, opened, merge):
            yield model

    def load_base_tokenizer(self, *, base: str | None = None, location: str | None = None) -> Any:
        """The registered base's tokenizer (from ``location``, default: the location recorded)."""
        from transformers import AutoTokenizer

        base_entry, _ = self.activation_set(packs=[], base=base)
        try:
            return AutoTokenizer.from_pretrained(location or base_entry.location)
        except (OSError, ValueError) as exc:
            raise RegistryError(f"cannot load the tokenizer of base {base_entry.name} from "
                                f"{location or base_entry.location}: {str(exc).splitlines()[0]}") from exc

    def load_base_model(self, *, base: str | None = None, location: str | None = None) -> tuple[Any, Any, BaseEntry]:
        """Load the registered base with ``transformers`` in its stored dtype and check its weights.

        Args:
            base: Registered base name (needed when there are several).
            location: Where its weights are (default: the location recorded at add).

        Returns:
            (model in eval mode, tokenizer, base entry).

        Raises:
            MismatchError: The weights at ``location`` are not the registered base.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from skillhub.progress import quiet_transformers

        base_entry, _ = self.activation_set(packs=[], base=base)
        where = location or base_entry.location
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(where, dtype="auto")
            tokenizer = AutoTokenizer.from_pretrained(where)
        model.eval()
        self.verify_base_model(model, base=base)
        return model, tokenizer, base_entry

    def verify_base_model(self, model: torch.nn.Module, *, base: str | None = None) -> None:
        """Check that a loaded model holds exactly the registered base weights.

        Raises:
            MismatchError: It does not (another model, or loaded in another dtype).
        """
        from skillhub.activation import check_model_is_base

        base_entry, _ = self.activation_set(packs=[], base=base)
        check_model_is_base(model, base_entry.fingerprint, base_entry.name)

    # ------------------------------------------------------------------ consistency

    def doctor(self, *, repair: bool = False) -> DoctorReport:
        """Check every stored pack against the database; with ``repair``, remove leftovers that
        provably are skillhub's (see :mod:`skillhub.registry.doctor`)."""
        return doctor_checks.doctor(self.db, self.store, repair=repair)
