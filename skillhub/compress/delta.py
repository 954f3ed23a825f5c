"""The parameter delta tuned - base, computed in float32 one tensor at a time."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from skillhub.errors import DeltaError, MismatchError
from skillhub.io.checkpoint import Checkpoint, Fingerprint

_LISTED = 5  # how many offending tensor names an error message spells out


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" (and {len(names) - _LISTED} more)" if len(names) > _LISTED else "")


def check_compatible(base: Checkpoint, tuned: Checkpoint) -> None:
    """Refuse a tuned checkpoint that is not a fine-tune of ``base``'s architecture.

    Raises:
        MismatchError: Naming the architectures, or the tensors that are missing, extra or
            of a different shape, or the head that is tied in one and untied in the other.
    """
    if base.architecture != tuned.architecture or base.model_type != tuned.model_type:
        raise MismatchError(
            f"architectures differ: base is {base.architecture} ({base.model_type}), "
            f"tuned is {tuned.architecture} ({tuned.model_type})"
        )
    base_names, tuned_names = set(base.names()), set(tuned.names())
    missing = sorted(base_names - tuned_names)
    extra = sorted(tuned_names - base_names)
    if base.tie_word_embeddings != tuned.tie_word_embeddings or (
        (missing or extra) and all("lm_head" in n for n in missing + extra)
    ):
        tied, untied = ("base", "tuned") if base.tie_word_embeddings else ("tuned", "base")
        raise MismatchError(
            f"the {tied} model ties its output head to the input embeddings but the {untied} model does not "
            f"(tensors only on one side: {_names(missing + extra) or 'none'}); fine-tune with the same "
            "tie_word_embeddings setting as the base"
        )
    if missing:
        raise MismatchError(f"tuned checkpoint lacks {len(missing)} tensor(s) of the base: {_names(missing)}")
    if extra:
        raise MismatchError(f"tuned checkpoint has {len(extra)} tensor(s) the base lacks: {_names(extra)}")
    reshaped = [
        f"{n} {list(base.shape(n))} vs {list(tuned.shape(n))}"
        for n in sorted(base_names)
        if base.shape(n) != tuned.shape(n)
    ]
    if reshaped:
        raise MismatchError(f"{len(reshaped)} tensor(s) differ in shape (base vs tuned): {_names(reshaped)}")


@dataclass
class TensorDelta:
    """One parameter's delta and what activation needs to know about the base tensor."""

    name: str
    delta: torch.Tensor  # float32, shape of the parameter
    base_dtype: torch.dtype


def iter_deltas(
    base: Checkpoint, tuned: Checkpoint, *, names: list[str] | None = None, fingerprint: Fingerprint | None = None
) -> Iterator[TensorDelta]:
    """Yield the delta of every parameter, holding two tensors in memory at a time.

    Args:
        base: The base checkpoint.
        tuned: Its fine-tune; call :func:`check_compatible` first.
        names: The parameters to visit, in this order (default: all, sorted).
        fingerprint: Fed with every base tensor on the way, so the base fingerprint costs no extra read.

    Raises:
        DeltaError: A delta holds NaN or Inf (naming the tensor).
    """
    for name in base.names() if names is None else names:
        yield read_delta(base, tuned, name, fingerprint)  # no tensor stays in this frame across the yield


def read_delta(base: Checkpoint, tuned: Checkpoint, name: str, fingerprint: Fingerprint | None = None
               ) -> TensorDelta:
    """The delta of one parameter (see :func:`iter_deltas`)."""
    base_tensor = base.read(name)
    if fingerprint is not None:
        fingerprint.update(name, base_tensor)
    delta = tuned.read(name).to(torch.float32).sub_(base_tensor)
    # One reduction instead of an elementwise test: a sum is finite only if every term is
    # (the exact count is made only for an error message).
    if not torch.isfinite(delta.sum()) and not torch.isfinite(delta).all():
        bad = int((~torch.isfinite(delta)).sum())
        raise DeltaError(f"delta of {name} has {bad} NaN/Inf value(s): the tuned checkpoint is broken")
    return TensorDelta(name=name, delta=delta, base_dtype=base_tensor.dtype)
