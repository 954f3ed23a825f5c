"""The operator protocol every compression operator honours, and params validation.

An operator turns one parameter's float32 delta into named tensors plus small JSON
metadata, and turns them back. It may also say, from the metadata alone, which tensors it
stored with which dtype and shape (``expected_fields``), so that a pack from anywhere is
checked before anything is decoded. It is stateless: everything decode needs is in the
stored tensors, the recorded params and the metadata encode returned, so a pack
decodes from its manifest alone. Built-in operators are registered through skillhub's
own pyproject entry points, exactly like third-party ones; discovery lives in
:mod:`skillhub.operators.discovery`, and plugins/README.md is the guide for plugin authors.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import jsonschema
import torch

from skillhub.errors import OperatorError


@dataclass(frozen=True)
class LayerStatistics:
    """Calibration statistics of one linear layer's input x (see :mod:`skillhub.compress.calibrate`)."""

    # (in_features, in_features) = 2/n X^T X, float64; for experts stored as one 3-D tensor, one per
    # expert, stacked: (experts, in_features, in_features) (see skillhub.operators.parts).
    hessian: torch.Tensor
    samples: int  # number of input vectors n
    transposed: bool = False  # the checkpoint stores this weight as (in, out), e.g. GPT-2's Conv1D
    # No other module reads this Hessian, so the operator may overwrite it (GPTQ factors it in its
    # own storage: one n x n buffer, not two, at an 8B model's 14336-wide down_proj). A caller that
    # hands the same statistics to more than one encode must pass them with exclusive=False.
    exclusive: bool = False


@dataclass(frozen=True)
class EncodeContext:
    """What an operator may know about the tensor it encodes besides its values."""

    name: str
    role: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    # Calibration statistics of this parameter's layer input, when the caller has them.
    calibration: LayerStatistics | None = None

    def generator(self) -> torch.Generator:
        """A generator seeded from the context seed and the parameter name, so results are reproducible
        and independent of the order in which parameters are encoded."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed((self.seed * 1_000_003 + _stable_hash(self.name)) % (2**63))
        return gen


def _stable_hash(text: str) -> int:
    value = 0
    for byte in text.encode("utf-8"):
        value = (value * 131 + byte) % (2**61 - 1)
    return value


@dataclass
class Encoded:
    """Output of :meth:`Operator.encode`: tensors to store and JSON-able metadata."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


class DeltaBlocks(Protocol):
    """A delta too large to hold whole (a 128k-vocabulary embedding: 2 GB in float32), seen as
    consecutive flat float32 blocks of whole rows, in order. Each iteration reads it again."""

    shape: tuple[int, ...]

    def __iter__(self) -> Iterator[torch.Tensor]: ...


@dataclass
class BlockEncoded:
    """Output of ``encode_blocks``: what ``encode`` returns for the whole delta, and the squared
    Frobenius distance between the delta and what those tensors decode to."""

    encoded: Encoded
    squared_error: float


@runtime_checkable
class Operator(Protocol):
    """A compression operator.

    ``name`` is its entry-point name; ``version`` is ``MAJOR.MINOR``. An operator may also
    declare ``decodes``, a PEP 440 specifier of the versions whose data it can decode
    (default ``==MAJOR.*``); decode receives the version the data was written by, so a 2.x
    operator that still reads 1.x data can dispatch on it.
    """

    name: str
    version: str
    params_schema: dict[str, Any]

    def encode(self, delta: torch.Tensor, params: Mapping[str, Any], ctx: EncodeContext) -> Encoded:
        """Encode a float32 delta; ``params`` are already validated and defaulted."""
        ...

    def decode(
        self,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any],
        params: Mapping[str, Any],
        shape: tuple[int, ...],
        *,
        version: str,
    ) -> torch.Tensor:
        """Return the float32 delta of ``shape`` that the stored tensors stand for
        (written by this operator at ``version``)."""
        ...

    # Optional (every built-in has it, and skillhub.testing checks it when present):
    #
    #   def expected_fields(self, meta, params, shape, *, version) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]
    #
    # The tensors decode will read for this meta, params and delta shape, with their dtype and
    # shape, computed without touching the tensors. It raises ValueError when the meta does not
    # fit (a missing key, a rank larger than the matrix, bits out of range...). Without it, a pack
    # is still decoded once and checked when it is added to a registry.
    #
    #   def encode_blocks(self, delta: DeltaBlocks, params, ctx) -> BlockEncoded
    #
    # For a delta streamed a row block at a time (see DeltaBlocks): the same tensors and meta that
    # encode returns for the whole delta, byte for byte, holding no more than a few blocks and its
    # output. create uses it for deltas above $SKILLHUB_STREAM_ABOVE_MIB (magnitude-prune has it).
    #
    #   def factors(self, tensors, meta, params, shape, *, version) -> tuple[torch.Tensor, torch.Tensor]
    #
    # For a low-rank operator: float32 factors B (m x r) and A (r x n) whose product is exactly the
    # delta decode returns, as an (m, n) matrix (the first dimension by the rest flattened). PEFT
    # export uses them instead of factorizing the dense delta; operators without it export densely.

FieldLayout = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def expected_fields(operator: Operator, meta: Mapping[str, Any], params: Mapping[str, Any], shape: tuple[int, ...],
                    *, version: str) -> FieldLayout | None:
    """The operator's ``expected_fields`` (None if it has none); any way it refuses the meta
    (ValueError, or a KeyError or TypeError it did not catch) becomes ValueError."""
    method = getattr(operator, "expected_fields", None)
    if method is None:
        return None
    try:
        return dict(method(meta, params, shape, version=version))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"meta lacks or mistypes {exc}") from exc


def meta_int(meta: Mapping[str, Any], key: str, low: int, high: int) -> int:
    """``meta[key]`` as an int in [low, high]; ValueError otherwise (for ``expected_fields``)."""
    value = meta.get(key) if isinstance(meta, Mapping) else None
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"meta {key!r} must be a whole number in [{low}, {high}], got {value!r}"[:120])
    return value


def resolve_params(operator: Operator, params: Mapping[str, Any] | None, *, where: str) -> dict[str, Any]:
    """Validate ``params`` against the operator's schema and fill in its top-level defaults.

    Args:
        operator: The operator the params are for.
        params: Params as written in a recipe.
        where: What to name in the error, e.g. ``"recipe 'paper' rule 3"``.

    Raises:
        OperatorError: Listing every invalid field.
    """
    given = dict(params or {})
    validator_cls = jsonschema.validators.validator_for(operator.params_schema)
    problems = sorted(
        validator_cls(operator.params_schema).iter_errors(given), key=lambda e: list(e.absolute_path)
    )
    if problems:
        listed = "; ".join(
            f"{'/'.join(map(str, p.absolute_path)) or '(params)'}: {_explain(p)}" for p in problems
        )
        raise OperatorError(f"{where}: invalid params for operator {operator.name!r}: {listed}")
    resolved = {
        key: copy.deepcopy(spec["default"])
        for key, spec in operator.params_schema.get("properties", {}).items()
        if "default" in spec
    }
    resolved.update(given)
    return resolved


def _explain(problem: jsonschema.ValidationError) -> str:
    # "is not valid under any of the given schemas" says nothing; the alternatives' own messages do.
    if problem.validator in ("oneOf", "anyOf") and problem.context:
        return "needs one of: " + " | ".join(sorted({sub.message for sub in problem.context}))
    return problem.message
