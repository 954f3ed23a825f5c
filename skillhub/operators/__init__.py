"""Compression operators: the protocol, and discovery through the ``skillhub.operators`` entry points.

An operator turns one parameter's float32 delta into named tensors plus small JSON
metadata, and turns them back. It is stateless: everything decode needs is in the
stored tensors, the recorded params and the metadata encode returned, so a pack
decodes from its manifest alone. Built-in operators are registered through skillhub's
own pyproject entry points, exactly like third-party ones.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Protocol, runtime_checkable

import jsonschema
import torch

from skillhub.errors import OperatorError

ENTRY_POINT_GROUP = "skillhub.operators"


@dataclass(frozen=True)
class LayerStatistics:
    """Calibration statistics of one linear layer's input x (see :mod:`skillhub.calibrate`)."""

    hessian: torch.Tensor  # (in_features, in_features) = 2/n X^T X, float64
    samples: int  # number of input vectors n
    transposed: bool = False  # the checkpoint stores this weight as (in, out), e.g. GPT-2's Conv1D


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


@runtime_checkable
class Operator(Protocol):
    """A compression operator. ``name`` is its entry-point name; ``version`` is ``MAJOR.MINOR``:
    a pack decodes with any installed version of the same major."""

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
    ) -> torch.Tensor:
        """Return the float32 delta of ``shape`` that the stored tensors stand for."""
        ...


@functools.cache
def _entry_points() -> dict[str, metadata.EntryPoint]:
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def operator_names() -> list[str]:
    """Names of every installed operator, sorted."""
    return sorted(_entry_points())


@functools.cache
def get_operator(name: str) -> Operator:
    """The installed operator called ``name``.

    Raises:
        OperatorError: No installed distribution provides it (the message lists what is installed).
    """
    ep = _entry_points().get(name)
    if ep is None:
        raise OperatorError(
            f"unknown operator {name!r}; installed operators: {', '.join(operator_names())}. "
            "If it comes from a plugin, install that plugin's distribution"
        )
    try:
        operator = ep.load()()
    except Exception as exc:  # a broken plugin must not take the caller down with a traceback
        dist = ep.dist.name if ep.dist else "unknown distribution"
        raise OperatorError(f"operator {name!r} from {dist} failed to load: {exc}") from exc
    return operator


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


def check_version(operator: Operator, stored_version: str, *, module: str) -> None:
    """Refuse to decode data written by an incompatible (different major) operator version."""
    if stored_version.split(".")[0] != operator.version.split(".")[0]:
        raise OperatorError(
            f"{module} was encoded by {operator.name} {stored_version} but the installed {operator.name} is "
            f"{operator.version}, which cannot decode it; install a {stored_version.split('.')[0]}.x version"
        )
