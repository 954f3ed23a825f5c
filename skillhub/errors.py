"""The one error tree of skillhub.

Every failure a user can cause (bad input, missing files, mismatched checkpoints) is a
:class:`SkillhubError`; the CLI turns it into a single ``Error: ...`` line and exit status 1,
adding the next step to take from one ordered table (``skillhub/cli/errors.py``). Anything
else that escapes is a bug and keeps its traceback. Errors that name a thing carry it as
attributes, so callers can act on the facts rather than parse the message::

    SkillhubError
    ├── CheckpointError        a base or tuned checkpoint is unreadable or unusable
    ├── MismatchError          base and tuned (or a pack and a base) do not fit together
    ├── DeltaError             a parameter delta is unusable (NaN, Inf)
    ├── RecipeError            a recipe is malformed or names something unknown
    ├── OperatorError          an operator is unknown, not installed, or given invalid params
    ├── CalibrationError       calibration text is missing, empty or too short
    ├── BudgetError            a byte budget cannot be met
    ├── PackError              a SkillPack is missing, corrupt, or fails its schema
    ├── InvalidNameError       a pack, task or base name breaks the naming rule
    ├── OutputExistsError      an output exists and --force was not given (.path)
    │   └── OutputConflictError    it would overwrite or nest in an input, or is not skillhub's
    ├── HubError               a Hugging Face Hub request failed or a repo lacks what is needed
    ├── GraftError             a graft's source, prompts, scorer or work directory is unusable
    └── RegistryError          the registry cannot be opened, or an operation on it is invalid
        ├── ReadOnlyRegistryError  writes are refused (read-only directory, newer skillhub)
        └── NotFoundError          a pack, task or base model does not exist (.kind, .name)
"""

from __future__ import annotations

import os
from collections.abc import Sequence


class SkillhubError(Exception):
    """Root of every error skillhub raises on purpose."""


class CheckpointError(SkillhubError):
    """A base or tuned checkpoint cannot be read or is not usable (pickle-only, truncated...)."""


class MismatchError(SkillhubError):
    """Base and tuned checkpoints (or a pack and a base) do not fit together."""


class DeltaError(SkillhubError):
    """A parameter delta is unusable, e.g. it holds NaN or Inf."""


class RecipeError(SkillhubError):
    """A recipe is malformed or names something that does not exist."""


class OperatorError(SkillhubError):
    """An operator is unknown, not installed, or was given invalid params."""


class GraftError(SkillhubError):
    """A graft cannot run: a source that cannot generate, prompts with nothing usable, a scorer
    that cannot score, or a work directory that belongs to another graft."""


class CalibrationError(SkillhubError):
    """Calibration text is missing, empty, unreadable, or too short for the windows asked for."""


class BudgetError(SkillhubError):
    """A byte budget (--ratio) is invalid or cannot be met."""


class PackError(SkillhubError):
    """A SkillPack on disk is missing, corrupt, or fails its schema."""


class InvalidNameError(SkillhubError):
    """A name given by a user or a file breaks the naming rule (see skillhub.pack.names)."""


class OutputExistsError(SkillhubError):
    """An output path already exists and ``force`` was not given."""

    def __init__(self, path: str | os.PathLike[str], message: str | None = None) -> None:
        self.path = str(path)
        super().__init__(message or f"{path} already exists")


class OutputConflictError(OutputExistsError):
    """The output would overwrite or nest inside an input, the registry or the working directory,
    or it exists and skillhub did not write it (so even ``force`` may not replace it)."""


class HubError(SkillhubError):
    """A Hugging Face Hub request failed, or a repo does not hold what skillhub expects."""


class RegistryError(SkillhubError):
    """The registry cannot be opened or a registry operation is invalid."""


class ReadOnlyRegistryError(RegistryError):
    """The registry may be read but not changed (a read-only directory, or a newer skillhub's)."""


class NotFoundError(RegistryError):
    """A pack, task or base model named by the user does not exist.

    Attributes:
        kind: ``"pack"``, ``"task"`` or ``"base model"``.
        name: What was asked for (None: nothing of that kind exists yet).
        known: What does exist, when that helps.
        where: Where it was looked for (``"in the registry"``, ``"with an eval set"``...).
    """

    def __init__(self, kind: str, name: str | None, *, known: Sequence[str] = (), where: str = "in the registry",
                 detail: str = "") -> None:
        self.kind, self.name, self.known, self.where = kind, name, tuple(known), where
        if name is None:
            message = f"the registry has no {kind} yet"
        else:
            message = f"no {kind} {name!r} {where}"
        if detail:
            message += f" {detail}"
        if known:
            message += f"; known: {', '.join(known)}"
        super().__init__(message)
