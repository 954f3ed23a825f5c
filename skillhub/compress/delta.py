"""The parameter delta tuned - base, computed in float32 one tensor at a time, or a row block at a
time for a tensor too large to hold whole (:class:`RowBlocks`)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from skillhub import config
from skillhub.compress.recipe import ModulePlan
from skillhub.errors import DeltaError, MismatchError
from skillhub.io.checkpoint import Checkpoint, Fingerprint, hash_bytes

_LISTED = 5  # how many offending tensor names an error message spells out
# Elements per row block of a streamed delta: 16 MB in float32, far past per-call overheads and far
# below any tensor worth streaming.
BLOCK_ELEMENTS = 1 << 22


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" (and {len(names) - _LISTED} more)" if len(names) > _LISTED else "")


def read_in_blocks(plan: ModulePlan, base: Checkpoint, tuned: Checkpoint, name: str) -> bool:
    """Whether ``create`` encodes ``name`` from :class:`RowBlocks`: its operator can (``encode_blocks``),
    its float32 delta is larger than $SKILLHUB_STREAM_ABOVE_MIB, and both checkpoints read it in row
    blocks at no extra cost."""
    shape = base.shape(name)
    return (hasattr(plan.operator, "encode_blocks") and plan.split is None and len(shape) >= 1
            and 4 * math.prod(shape) > config.stream_above_bytes() and base.reads_blocks(name)
            and tuned.reads_blocks(name))


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
    if not _all_finite(delta):
        bad = int((~torch.isfinite(delta)).sum())
        raise DeltaError(f"delta of {name} has {bad} NaN/Inf value(s): the tuned checkpoint is broken")
    return TensorDelta(name=name, delta=delta, base_dtype=base_tensor.dtype)


def _all_finite(delta: torch.Tensor) -> bool:
    # One reduction instead of an elementwise test: a sum is finite only if every term is (an
    # overflowing sum of finite terms is the rare case the elementwise test settles).
    return bool(torch.isfinite(delta.sum())) or bool(torch.isfinite(delta).all())


class RowBlocks:
    """One parameter's delta read a row block at a time (a :class:`skillhub.operators.DeltaBlocks`):
    its blocks are float32 and flat, and every iteration reads the checkpoints again.

    The first complete iteration also does what :func:`read_delta` does in one read: it checks the
    delta is finite, measures its norm (``squared_norm``) and feeds the base tensor to the fingerprint.
    """

    def __init__(self, base: Checkpoint, tuned: Checkpoint, name: str, *, fingerprint: Fingerprint | None = None,
                 block_elements: int = BLOCK_ELEMENTS) -> None:
        self.name, self.shape, self.base_dtype = name, tuple(base.shape(name)), base.dtype(name)
        self._base, self._tuned, self._fingerprint = base, tuned, fingerprint
        self._rows = max(1, block_elements // max(1, math.prod(self.shape[1:])))
        self.squared_norm: float | None = None  # known once a whole iteration has been read

    def _pairs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.shape[0], self._rows):
            stop = min(start + self._rows, self.shape[0])
            yield self._base.read_block(self.name, start, stop), self._tuned.read_block(self.name, start, stop)

    def changed(self) -> bool:
        """Whether any element differs, read until the first block that does (an unchanged tensor is
        read whole once, and fingerprinted)."""
        digest = hashlib.sha256()
        for base, tuned in self._pairs():
            same = torch.equal(base, tuned) if base.dtype == tuned.dtype else torch.equal(base.float(), tuned.float())
            if not same:
                return True
            hash_bytes(digest, base)
        self._record(digest)
        self.squared_norm = 0.0
        return False

    def __iter__(self) -> Iterator[torch.Tensor]:
        first, digest, squares, row = self.squared_norm is None, hashlib.sha256(), 0.0, 0
        for base, tuned in self._pairs():
            delta = tuned.to(torch.float32).sub_(base).reshape(-1)
            if first:
                hash_bytes(digest, base)
                if not _all_finite(delta):
                    raise DeltaError(f"delta of {self.name} has NaN/Inf values (rows {row}:{row + len(base)}): "
                                     "the tuned checkpoint is broken")
                squares += float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
            row += len(base)
            base = tuned = None
            yield delta
        if first:
            self._record(digest)
            self.squared_norm = squares

    def _record(self, digest: object) -> None:
        if self._fingerprint is not None:
            self._fingerprint.record(self.name, self.base_dtype, self.shape, digest)
