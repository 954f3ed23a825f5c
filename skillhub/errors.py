"""The one error tree of skillhub.

Every failure a user can cause (bad input, missing files, mismatched checkpoints) is a
`SkillhubError`; the CLI turns it into a single ``Error: ...`` line and exit status 1.
Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


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


class PackError(SkillhubError):
    """A SkillPack on disk is missing, corrupt, or fails its schema."""


class OutputExistsError(SkillhubError):
    """An output path already exists and ``force`` was not given."""


class HubError(SkillhubError):
    """A Hugging Face Hub request failed, or a repo does not hold what skillhub expects."""
