"""``bitdelta``: the sign of the delta with one scale per row (after BitDelta, Liu et al., 2024).

A delta is viewed as a matrix (rows = first dimension, a vector is one row). Each element
is stored as one sign bit and decoded as ``scale[row] * (+1 | -1)``; the per-row scale is
the mean absolute value of the row, which minimises the squared error for fixed signs.
(BitDelta then distils the scales against the fine-tuned model; this operator keeps the
closed form, so it needs no calibration data.)

Stored fields:
    ``signs``: one bit per element (1 = non-negative), row-major, little-endian within each
        byte, 8 signs a byte: ceil(numel / 8) bytes.
    ``scale``: one value per row in ``scale_dtype``.

Error: sqrt(1 - mean|x|^2 / mean(x^2)) per row, 0.60 for Gaussian rows; exact for rows whose
elements share one magnitude.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from skillhub.operators import EncodeContext, Encoded
from skillhub.numerics.bitpack import pack_codes, packed_nbytes, unpack_codes

__all__ = ["BitDeltaOperator"]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _rows(shape: tuple[int, ...]) -> tuple[int, int]:
    """The matrix view of a delta: (first dimension, the rest); a vector is one row."""
    rows = shape[0] if len(shape) > 1 else 1
    return rows, (math.prod(shape) // rows if rows else 0)


class BitDeltaOperator:
    """1-bit signs plus a per-row scale."""

    name = "bitdelta"
    version = "1.0"
    params_schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "scale_dtype": {"enum": list(_DTYPES), "default": "float16",
                            "description": "dtype of the per-row scales."},
        },
        "examples": [{}, {"scale_dtype": "float32"}],
    }

    def encode(self, delta: torch.Tensor, params: Mapping[str, Any], ctx: EncodeContext) -> Encoded:
        rows, cols = _rows(tuple(delta.shape))
        matrix = delta.reshape(rows, cols)
        scale = matrix.abs().mean(dim=1)
        signs = pack_codes((matrix >= 0).to(torch.uint8), 1)
        return Encoded(tensors={"signs": signs, "scale": scale.to(_DTYPES[params["scale_dtype"]]).cpu()})

    def expected_fields(self, meta: Mapping[str, Any], params: Mapping[str, Any], shape: tuple[int, ...], *,
                        version: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        rows, cols = _rows(shape)
        return {"signs": (torch.uint8, (packed_nbytes(rows * cols, 1),)),
                "scale": (_DTYPES[params["scale_dtype"]], (rows,))}

    def decode(
        self,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any],
        params: Mapping[str, Any],
        shape: tuple[int, ...],
        *,
        version: str,
    ) -> torch.Tensor:
        rows, cols = _rows(shape)
        positive = unpack_codes(tensors["signs"], 1, rows * cols).reshape(rows, cols)
        signs = positive.to(torch.float32) * 2 - 1
        return (signs * tensors["scale"].to(torch.float32)[:, None]).reshape(shape)
