"""The one encode -> decode -> measure step: what ``create_pack``, budget mode, the compression
benchmark and the conformance suite all do with an operator and a delta."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from skillhub.errors import OperatorError
from skillhub.operators.parts import Split, decode_split, encode_split
from skillhub.operators.protocol import EncodeContext, Encoded, Operator


@dataclass(frozen=True)
class EncodedModule:
    """One parameter's delta, encoded and decoded back.

    Attributes:
        encoded: The tensors and meta the operator stores.
        decoded: What they decode to (float32, on the CPU).
        stored_bytes: Bytes of the stored tensors.
        error_norm: ||delta - decoded||_F.
        delta_norm: ||delta||_F.
    """

    encoded: Encoded
    decoded: torch.Tensor
    stored_bytes: int
    error_norm: float
    delta_norm: float

    @property
    def relative_error(self) -> float:
        """||delta - decoded||_F / ||delta||_F (0 for a zero delta)."""
        return self.error_norm / self.delta_norm if self.delta_norm else 0.0


def stored_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes the tensors take in a pack (their own bytes, as the manifest counts them)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def encode_module(operator: Operator, delta: torch.Tensor, params: Mapping[str, Any], ctx: EncodeContext,
                  *, device: torch.device | None = None, split: Split | None = None) -> EncodedModule:
    """Encode ``delta`` (on ``device``, default where it is), decode it back on the CPU, measure the error.

    With ``split``, each of the matrices ``delta`` is made of is encoded on its own (see
    :mod:`skillhub.operators.parts`).

    Raises:
        OperatorError: The operator refused the input (its documented ValueError), naming the parameter.
    """
    on_device = delta if device is None else delta.to(device)
    try:
        encoded = encode_split(operator, on_device, params, ctx, split)
        decoded = decode_split(operator, {k: v.cpu() for k, v in encoded.tensors.items()}, encoded.meta, params,
                               tuple(delta.shape), split, version=operator.version)
    except ValueError as exc:  # operators' documented way to refuse an input
        raise OperatorError(f"operator {operator.name} cannot encode {ctx.name}: {exc}") from exc
    reference = delta.cpu()
    return EncodedModule(encoded=encoded, decoded=decoded, stored_bytes=stored_bytes(encoded.tensors),
                         error_norm=_distance(decoded, reference), delta_norm=float(torch.linalg.vector_norm(reference)))


def _distance(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 22) -> float:
    """||a - b||_F, a few MB at a time instead of one temporary of the module's size."""
    squares = sum(float(torch.linalg.vector_norm(x - y)) ** 2
                  for x, y in zip(a.reshape(-1).split(chunk), b.reshape(-1).split(chunk)))
    return squares**0.5
