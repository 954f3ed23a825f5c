"""``rtn``: group-wise asymmetric round-to-nearest quantization of the whole delta.

Rows are the tensor's first dimension (output features of a linear layer); groups run
along the remaining, flattened dimensions. Error bound: one quantization step per element
(see :mod:`skillhub.numerics.quantize`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from skillhub.operators import EncodeContext, Encoded, FieldLayout
from skillhub.numerics.quantize import QUANT_BITS, QuantizedMatrix, quantize_rtn, quantized_fields


def as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) view of a tensor of ``shape``: 1-D tensors are a single row."""
    if len(shape) <= 1:
        return 1, (shape[0] if shape else 1)
    cols = 1
    for d in shape[1:]:
        cols *= d
    return shape[0], cols


class RTNOperator:
    """k-bit group-wise asymmetric round-to-nearest."""

    name = "rtn"
    version = "1.0"
    params_schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "bits": {"enum": list(QUANT_BITS), "default": 4},
            "group_size": {"type": "integer", "minimum": 1, "default": 128},
        },
        "examples": [{"bits": 4, "group_size": 64}, {"bits": 3, "group_size": 32}],
    }

    def encode(self, delta: torch.Tensor, params: Mapping[str, Any], ctx: EncodeContext) -> Encoded:
        rows, cols = as_matrix(tuple(delta.shape))
        quantized = quantize_rtn(delta.reshape(rows, cols), bits=params["bits"], group_size=params["group_size"])
        codes, scales, zeros = quantized.packed()
        return Encoded(tensors={"codes": codes, "scales": scales, "zeros": zeros})

    def expected_fields(self, meta: Mapping[str, Any], params: Mapping[str, Any], shape: tuple[int, ...], *,
                        version: str) -> FieldLayout:
        rows, cols = as_matrix(shape)
        return quantized_fields(rows, cols, params["bits"], params["group_size"])

    def decode(
        self,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any],
        params: Mapping[str, Any],
        shape: tuple[int, ...],
        *,
        version: str,
    ) -> torch.Tensor:
        rows, cols = as_matrix(shape)
        quantized = QuantizedMatrix.from_packed(
            tensors["codes"], tensors["scales"], tensors["zeros"],
            rows=rows, cols=cols, bits=params["bits"], group_size=params["group_size"],
        )
        return quantized.dequantize().reshape(shape)
