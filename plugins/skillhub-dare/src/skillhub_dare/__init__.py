"""``dare``: DARE, drop and rescale (Yu et al., "Language Models are Super Mario", 2023).

Each delta element is dropped with probability ``drop``; the survivors are divided by
``1 - drop`` so that the decoded delta equals the original in expectation. The drop mask
comes from the encode context's generator (seeded from the context seed and the parameter
name), so a pack is reproducible.

Stored fields:
    ``mask``: one bit per element (1 = kept), little-endian within each byte, 8 per byte.
    ``values``: the kept elements, rescaled, in ``dtype``, in row-major order.

Error: unbiased, with relative error about sqrt(drop / (1 - drop)) on a dense delta (3.0 at
the default 0.9): DARE relies on the model tolerating that noise, not on a small error.
Bytes: numel/8 + kept * itemsize (0.325 bytes per element at drop 0.9 in float16).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from skillhub.operators import EncodeContext, Encoded, meta_int
from skillhub.numerics.bitpack import pack_codes, packed_nbytes, unpack_codes

__all__ = ["DareOperator"]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class DareOperator:
    """Random drop with rescale, seeded by the encode context."""

    name = "dare"
    version = "1.0"
    params_schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "drop": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.9,
                     "description": "Probability of dropping each delta element."},
            "dtype": {"enum": list(_DTYPES), "default": "float16",
                      "description": "dtype of the kept, rescaled values."},
        },
        "examples": [{"drop": 0.9}, {"drop": 0.5, "dtype": "float32"}, {"drop": 0.0}],
    }

    def encode(self, delta: torch.Tensor, params: Mapping[str, Any], ctx: EncodeContext) -> Encoded:
        drop = float(params["drop"])
        flat = delta.reshape(-1)
        draws = torch.rand(flat.numel(), generator=ctx.generator(), device=ctx.device, dtype=torch.float64)
        kept = (draws >= drop).to(flat.device)
        values = flat[kept] / (1.0 - drop)
        return Encoded(
            tensors={"mask": pack_codes(kept.to(torch.uint8), 1), "values": values.to(_DTYPES[params["dtype"]]).cpu()},
            meta={"kept": int(kept.sum())},
        )

    def expected_fields(self, meta: Mapping[str, Any], params: Mapping[str, Any], shape: tuple[int, ...], *,
                        version: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        count = math.prod(shape)
        kept = meta_int(meta, "kept", 0, count)
        return {"mask": (torch.uint8, (packed_nbytes(count, 1),)), "values": (_DTYPES[params["dtype"]], (kept,))}

    def decode(
        self,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any],
        params: Mapping[str, Any],
        shape: tuple[int, ...],
        *,
        version: str,
    ) -> torch.Tensor:
        count = math.prod(shape)
        kept = unpack_codes(tensors["mask"], 1, count).bool()
        values = tensors["values"].to(torch.float32)
        if values.numel() != int(kept.sum()) or values.numel() != meta["kept"]:
            raise ValueError(f"dare: {values.numel()} stored values for {int(kept.sum())} kept positions")
        out = torch.zeros(count, dtype=torch.float32)
        out[kept] = values
        return out.reshape(shape)
