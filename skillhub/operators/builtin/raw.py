"""``raw``: the delta itself, cast to a float dtype. Used for norms and biases.

Error bound: exact for float32; for float16/bfloat16 each element is off by at most half
a unit in the last place (relative 2**-11 for float16, 2**-8 for bfloat16, normal range).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from skillhub.operators import EncodeContext, Encoded, FieldLayout
from skillhub.io.tensorfile import dtype_from_name


class RawOperator:
    """Store the delta uncompressed in ``dtype``."""

    name = "raw"
    version = "1.0"
    params_schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "dtype": {"enum": ["float16", "bfloat16", "float32"], "default": "float16"},
        },
        "examples": [{"dtype": "float16"}, {"dtype": "float32"}],
    }

    def encode(self, delta: torch.Tensor, params: Mapping[str, Any], ctx: EncodeContext) -> Encoded:
        return Encoded(tensors={"values": delta.to(dtype_from_name(params["dtype"]))})

    def expected_fields(self, meta: Mapping[str, Any], params: Mapping[str, Any], shape: tuple[int, ...], *,
                        version: str) -> FieldLayout:
        return {"values": (dtype_from_name(params["dtype"]), tuple(shape))}

    def decode(
        self,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any],
        params: Mapping[str, Any],
        shape: tuple[int, ...],
        *,
        version: str,
    ) -> torch.Tensor:
        return tensors["values"].to(torch.float32).reshape(shape)
