"""Tensors stored as the matrices they are made of.

A checkpoint tensor is sometimes several matrices at once: MoE experts saved as one 3-D tensor
(GPT-OSS, Qwen3-MoE saved fused), or a fused projection (Phi-3's ``qkv_proj`` holds q, k and v
one above the other). Given to an operator whole, one SVD spans all of them and gets one
matrix's rank for several (or, for a 3-D stack flattened to experts x (a*b), a rank bounded by
the number of experts). A :class:`Split` cuts such a tensor into its matrices; each part is
encoded by the module's operator on its own, its fields stored as ``<part>.<field>`` and its
meta as ``meta["parts"][part]``, and decoding joins the parts back. Operators never see a split:
any operator, plugins included, works per part. The functions below take ``split=None`` for a
module stored whole, so callers have one path for both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from skillhub.operators.protocol import EncodeContext, Encoded, FieldLayout, LayerStatistics, Operator, expected_fields


@dataclass(frozen=True)
class Split:
    """Where a tensor is cut: along ``axis`` into pieces of ``sizes``; ``squeeze`` drops that axis
    from each piece (a 3-D stack of experts is axis 0, sizes 1, squeezed)."""

    axis: int
    sizes: tuple[int, ...]
    squeeze: bool = False

    @classmethod
    def experts(cls, count: int) -> Split:
        """A 3-D stack of ``count`` expert matrices."""
        return cls(axis=0, sizes=(1,) * count, squeeze=True)

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Split:
        return cls(axis=document["axis"], sizes=tuple(document["sizes"]), squeeze=document.get("squeeze", False))

    def as_json(self) -> dict[str, Any]:
        return {"axis": self.axis, "sizes": list(self.sizes), **({"squeeze": True} if self.squeeze else {})}

    def check(self, shape: tuple[int, ...]) -> None:
        """ValueError unless the pieces tile ``shape`` exactly (what a hostile manifest could get wrong)."""
        if not 0 <= self.axis < len(shape) or sum(self.sizes) != shape[self.axis] or min(self.sizes, default=0) < 1:
            raise ValueError(f"split {self.as_json()} does not tile shape {list(shape)}")
        if self.squeeze and set(self.sizes) != {1}:
            raise ValueError("a squeezed split must cut pieces of size 1")

    def part_shapes(self, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        shapes = []
        for size in self.sizes:
            piece = list(shape)
            piece[self.axis] = size
            if self.squeeze:
                del piece[self.axis]
            shapes.append(tuple(piece))
        return shapes

    def pieces(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        parts = torch.split(tensor, list(self.sizes), dim=self.axis)
        return [part.squeeze(self.axis) for part in parts] if self.squeeze else list(parts)

    def join(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(pieces, dim=self.axis) if self.squeeze else torch.cat(pieces, dim=self.axis)


def part_statistics(statistics: LayerStatistics | None, split: Split, part: int) -> LayerStatistics | None:
    """The calibration statistics of one part: a stack of experts has a Hessian per expert
    (``hessian`` is experts x in x in; an expert no token reached has none); pieces of a fused
    projection share the input of the whole (so no piece may overwrite it)."""
    if statistics is None:
        return None
    if statistics.hessian.dim() == 2:
        return replace(statistics, exclusive=False) if len(split.sizes) > 1 else statistics
    hessian = statistics.hessian[part]
    if not bool(hessian.any()):
        return None
    return replace(statistics, hessian=hessian)


def encode_split(operator: Operator, delta: torch.Tensor, params: Mapping[str, Any], ctx: EncodeContext,
                 split: Split | None) -> Encoded:
    """Encode every piece of ``delta`` on its own (with its own statistics and RNG stream)."""
    if split is None:
        return operator.encode(delta, params, ctx)
    tensors: dict[str, torch.Tensor] = {}
    metas = []
    for index, piece in enumerate(split.pieces(delta)):
        part_ctx = replace(ctx, name=f"{ctx.name}#{index}", calibration=part_statistics(ctx.calibration, split, index))
        encoded = operator.encode(piece.contiguous(), params, part_ctx)
        tensors.update({f"{index}.{field}": tensor for field, tensor in encoded.tensors.items()})
        metas.append(encoded.meta)
    return Encoded(tensors=tensors, meta={"parts": metas})


def decode_split(operator: Operator, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                 params: Mapping[str, Any], shape: tuple[int, ...], split: Split | None, *, version: str
                 ) -> torch.Tensor:
    if split is None:
        return operator.decode(tensors, meta, params, shape, version=version)
    pieces = []
    for index, (part_meta, part_shape) in enumerate(zip(_part_metas(meta, split), split.part_shapes(shape))):
        prefix = f"{index}."
        fields = {key[len(prefix):]: tensor for key, tensor in tensors.items() if key.startswith(prefix)}
        pieces.append(operator.decode(fields, part_meta, params, part_shape, version=version))
    return split.join(pieces)


def expected_split_fields(operator: Operator, meta: Mapping[str, Any], params: Mapping[str, Any],
                          shape: tuple[int, ...], split: Split | None, *, version: str) -> FieldLayout | None:
    """The stored fields of a module (``<part>.<field>`` when split); None for an operator without a layout."""
    if split is None:
        return expected_fields(operator, meta, params, shape, version=version)
    layout: FieldLayout = {}
    for index, (part_meta, part_shape) in enumerate(zip(_part_metas(meta, split), split.part_shapes(shape))):
        fields = expected_fields(operator, part_meta, params, part_shape, version=version)
        if fields is None:
            return None
        layout.update({f"{index}.{field}": spec for field, spec in fields.items()})
    return layout


def _part_metas(meta: Mapping[str, Any], split: Split) -> list[Mapping[str, Any]]:
    metas = meta.get("parts")
    if not isinstance(metas, list) or len(metas) != len(split.sizes) or not all(isinstance(m, dict) for m in metas):
        raise ValueError(f"meta 'parts' must hold one object per part ({len(split.sizes)})")
    return metas
