"""``magnitude-prune``: keep the largest-magnitude fraction of the delta, quantize what is kept.

The positions of kept values are stored either as a 1-bit mask over the tensor or as
fixed-width gaps between consecutive kept positions, whichever is smaller (``auto``):
a mask costs one bit per element, gaps cost ``kept * ceil(log2(max_gap + 1))`` bits,
which wins for small keep ratios.

Error bound: ``||delta - decoded||^2 = sum of dropped values^2 + quantization error^2``,
where each kept value is off by at most one quantization step of its group (exact for
``bits: 16``, which stores kept values as float16 up to float16 rounding).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from skillhub.operators import EncodeContext, Encoded, FieldLayout, meta_int
from skillhub.numerics.bitpack import pack_codes, packed_nbytes, unpack_codes
from skillhub.numerics.quantize import QUANT_BITS, QuantizedMatrix, quantize_rtn, quantized_fields


def top_magnitude_mask(values: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of exactly ``keep`` largest-|value| elements of a flat tensor (ties: lowest index)."""
    n = values.numel()
    if keep >= n:
        return torch.ones(n, dtype=torch.bool, device=values.device)
    magnitude = values.abs()
    # kthvalue is linear time; a full sort or topk of a 500M-element embedding is not.
    threshold = torch.kthvalue(magnitude.cpu(), n - keep + 1).values.to(values.device)
    mask = magnitude > threshold
    missing = keep - int(mask.sum())
    if missing > 0:
        ties = torch.nonzero(magnitude == threshold).squeeze(1)[:missing]
        mask[ties] = True
    return mask


class MagnitudePruneOperator:
    """Keep ratio ``keep`` of entries by magnitude, values quantized to ``bits`` (16 = float16)."""

    name = "magnitude-prune"
    version = "1.0"
    params_schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "keep": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.5},
            "bits": {"enum": [*QUANT_BITS, 16], "default": 4},
            "group_size": {"type": "integer", "minimum": 1, "default": 128},
            "index": {"enum": ["auto", "bitmask", "gaps"], "default": "auto"},
        },
        "examples": [{"keep": 0.1, "bits": 4}, {"keep": 0.5, "bits": 16, "index": "gaps"}],
    }

    def encode(self, delta: torch.Tensor, params: Mapping[str, Any], ctx: EncodeContext) -> Encoded:
        flat = delta.reshape(-1)
        n = flat.numel()
        kept = max(1, min(n, math.ceil(params["keep"] * n)))
        mask = top_magnitude_mask(flat, kept)
        positions = torch.nonzero(mask).squeeze(1).cpu()
        gaps = torch.diff(positions, prepend=torch.tensor([-1])) - 1
        gap_bits = max(1, int(gaps.max()).bit_length()) if kept else 1
        index = params["index"]
        if index == "auto":
            index = "gaps" if packed_nbytes(kept, gap_bits) < packed_nbytes(n, 1) else "bitmask"
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"kept": kept, "index": index}
        if index == "bitmask":
            tensors["mask"] = pack_codes(mask.to(torch.uint8), 1)
        else:
            if gap_bits > 32:
                raise ValueError("gaps wider than 32 bits; use index 'bitmask'")
            tensors["gaps"] = pack_codes(gaps, gap_bits)
            meta["gap_bits"] = gap_bits
        values = flat[mask].reshape(1, kept)
        if params["bits"] == 16:
            tensors["values"] = values.to(torch.float16).reshape(-1)
        else:
            codes, scales, zeros = quantize_rtn(values, bits=params["bits"], group_size=params["group_size"]).packed()
            tensors.update({"codes": codes, "scales": scales, "zeros": zeros})
        return Encoded(tensors=tensors, meta=meta)

    def expected_fields(self, meta: Mapping[str, Any], params: Mapping[str, Any], shape: tuple[int, ...], *,
                        version: str) -> FieldLayout:
        n = math.prod(shape)
        kept = meta_int(meta, "kept", 1, n)
        if meta.get("index") == "bitmask":
            fields: FieldLayout = {"mask": (torch.uint8, (packed_nbytes(n, 1),))}
        elif meta.get("index") == "gaps":
            fields = {"gaps": (torch.uint8, (packed_nbytes(kept, meta_int(meta, "gap_bits", 1, 32)),))}
        else:
            raise ValueError(f"meta 'index' must be 'bitmask' or 'gaps', got {meta.get('index')!r}"[:120])
        if params["bits"] == 16:
            fields["values"] = (torch.float16, (kept,))
        else:
            fields.update(quantized_fields(1, kept, params["bits"], params["group_size"]))
        return fields

    def decode(
        self,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any],
        params: Mapping[str, Any],
        shape: tuple[int, ...],
        *,
        version: str,
    ) -> torch.Tensor:
        n = math.prod(shape)
        kept = int(meta["kept"])
        if meta["index"] == "bitmask":
            positions = torch.nonzero(unpack_codes(tensors["mask"], 1, n)).squeeze(1)
        else:
            gaps = unpack_codes(tensors["gaps"], int(meta["gap_bits"]), kept).to(torch.int64)
            positions = torch.cumsum(gaps + 1, dim=0) - 1
        if params["bits"] == 16:
            values = tensors["values"].to(torch.float32)
        else:
            values = QuantizedMatrix.from_packed(
                tensors["codes"], tensors["scales"], tensors["zeros"],
                rows=1, cols=kept, bits=params["bits"], group_size=params["group_size"],
            ).dequantize().reshape(-1)
        out = torch.zeros(n, dtype=torch.float32)
        out[positions] = values
        return out.reshape(shape)
