"""``magnitude-prune``: keep the largest-magnitude fraction of the delta, quantize what is kept.

The positions of kept values are stored either as a 1-bit mask over the tensor or as
fixed-width gaps between consecutive kept positions, whichever is smaller (``auto``):
a mask costs one bit per element, gaps cost ``kept * ceil(log2(max_gap + 1))`` bits,
which wins for small keep ratios.

``encode_blocks`` gives the same bytes from a delta streamed a row block at a time (a 128k-row
embedding at 8B width is 2 GB in float32): two passes find the exact threshold by radix selection,
a third packs the mask and quantizes the kept values as they come.

Error bound: ``||delta - decoded||^2 = sum of dropped values^2 + quantization error^2``,
where each kept value is off by at most one quantization step of its group (exact for
``bits: 16``, which stores kept values as float16 up to float16 rounding).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from skillhub.operators import BlockEncoded, DeltaBlocks, EncodeContext, Encoded, FieldLayout, meta_int
from skillhub.numerics.bitpack import PackedStream, pack_codes, packed_nbytes, unpack_codes
from skillhub.numerics.quantize import (
    QUANT_BITS, QuantizedMatrix, StreamingQuantizer, quantize_rtn, quantized_fields,
)
from skillhub.numerics.selection import magnitude_threshold


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
        index, gap_bits = _index(params["index"], n, kept, int(gaps.max()))
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"kept": kept, "index": index}
        if index == "bitmask":
            tensors["mask"] = pack_codes(mask.to(torch.uint8), 1)
        else:
            tensors["gaps"] = pack_codes(gaps, gap_bits)
            meta["gap_bits"] = gap_bits
        values = flat[mask].reshape(1, kept)
        if params["bits"] == 16:
            tensors["values"] = values.to(torch.float16).reshape(-1)
        else:
            codes, scales, zeros = quantize_rtn(values, bits=params["bits"], group_size=params["group_size"]).packed()
            tensors.update({"codes": codes, "scales": scales, "zeros": zeros})
        return Encoded(tensors=tensors, meta=meta)

    def encode_blocks(self, delta: DeltaBlocks, params: Mapping[str, Any], ctx: EncodeContext) -> BlockEncoded:
        """:meth:`encode`'s bytes from a delta seen a row block at a time (three passes)."""
        n = math.prod(delta.shape)
        kept = max(1, min(n, math.ceil(params["keep"] * n)))
        threshold = magnitude_threshold(delta, kept) if kept < n else None
        ties = threshold.ties if threshold else 0
        mask = PackedStream(n, 1)
        values = _KeptValues(kept, params)
        dropped_squares, widest_gap, last, offset = 0.0, 0, -1, 0
        for block in delta:
            flat = block.reshape(-1)
            if threshold is None:
                chosen = torch.ones(flat.numel(), dtype=torch.bool)
            else:
                magnitude = flat.abs()
                chosen = magnitude > threshold.value
                if ties:
                    tied = torch.nonzero(magnitude == threshold.value).squeeze(1)[:ties]
                    chosen[tied] = True
                    ties -= tied.numel()
            mask.add(chosen.to(torch.uint8))
            positions = torch.nonzero(chosen).squeeze(1)
            if positions.numel():  # the gaps encode would store, the first one from the previous block's last
                gaps = torch.diff(positions, prepend=torch.tensor([last - offset])) - 1
                widest_gap = max(widest_gap, int(gaps.max()))
                last = int(positions[-1]) + offset
            values.add(flat[chosen])
            dropped_squares += float(torch.linalg.vector_norm(flat[~chosen], dtype=torch.float64)) ** 2
            offset += flat.numel()
        index, gap_bits = _index(params["index"], n, kept, widest_gap)
        tensors = {"mask": mask.finish()} if index == "bitmask" else {"gaps": _gaps(mask.finish(), n, kept, gap_bits)}
        tensors.update(values.finish())
        meta: dict[str, Any] = {"kept": kept, "index": index, **({"gap_bits": gap_bits} if index == "gaps" else {})}
        return BlockEncoded(Encoded(tensors=tensors, meta=meta), dropped_squares + values.squared_error)

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


def _index(index: str, n: int, kept: int, widest_gap: int) -> tuple[str, int]:
    """(index kind, gap width): ``auto`` takes the smaller of a bitmask and gap codes."""
    gap_bits = max(1, widest_gap.bit_length())
    if index == "auto":
        index = "gaps" if packed_nbytes(kept, gap_bits) < packed_nbytes(n, 1) else "bitmask"
    if index == "gaps" and gap_bits > 32:
        raise ValueError("gaps wider than 32 bits; use index 'bitmask'")
    return index, gap_bits


def _gaps(mask: torch.Tensor, n: int, kept: int, bits: int, chunk: int = 1 << 23) -> torch.Tensor:
    """The packed gap codes of the positions a packed bitmask marks, a chunk of it at a time."""
    gaps, last = PackedStream(kept, bits), -1
    for start in range(0, n, chunk):  # chunk is a multiple of 8: whole bytes of the mask
        positions = torch.nonzero(unpack_codes(mask[start // 8:], 1, min(chunk, n - start))).squeeze(1) + start
        if positions.numel():
            gaps.add(torch.diff(positions, prepend=torch.tensor([last])) - 1)
            last = int(positions[-1])
    return gaps.finish()


class _KeptValues:
    """The kept values as they arrive, stored as ``encode`` stores them: float16 or quantized."""

    def __init__(self, kept: int, params: Mapping[str, Any]) -> None:
        self._half = torch.empty(kept, dtype=torch.float16) if params["bits"] == 16 else None
        self._quantizer = None if params["bits"] == 16 else StreamingQuantizer(
            kept, bits=params["bits"], group_size=params["group_size"])
        self._count = 0
        self._half_squares = 0.0

    def add(self, values: torch.Tensor) -> None:
        if self._quantizer is not None:
            self._quantizer.add(values)
            return
        half = values.to(torch.float16)
        self._half[self._count:self._count + values.numel()] = half
        self._count += values.numel()
        self._half_squares += float(torch.linalg.vector_norm(values - half.float(), dtype=torch.float64)) ** 2

    @property
    def squared_error(self) -> float:
        return self._half_squares if self._quantizer is None else self._quantizer.squared_error

    def finish(self) -> dict[str, torch.Tensor]:
        if self._quantizer is None:
            return {"values": self._half}
        codes, scales, zeros = self._quantizer.finish()
        return {"codes": codes, "scales": scales, "zeros": zeros}
