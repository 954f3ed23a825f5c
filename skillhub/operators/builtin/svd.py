"""SVD-based operators: ``svd`` (energy threshold or numerically full), ``lowrank`` (fixed rank,
LoRA-style factors) and ``svd-mixed`` (rank groups quantized with their own bit widths, the
GraftLLM/Delta-CoMe storage).

Tensors of more than two dimensions are treated as (first dim, the rest flattened).

Error bounds (documented, tested):
- ``svd``: relative error^2 <= 1 - energy, plus float16 rounding of the factors.
- ``lowrank``: within 2% (plus float16 rounding) of the Eckart-Young optimum
  sqrt(sum_{i>r} sigma_i^2) / ||delta||; a randomized SVD with power iterations is used when
  the rank is far below min(rows, cols).
- ``svd-mixed``: the truncation error of its total rank, plus for each rank group g
  sigma_max(g) * (||U_g - U^_g||_F + ||V_g - V^_g||_F * ||U^_g||_2), where the factor
  errors are bounded element-wise by one quantization step (see quantize.py) for
  round-to-nearest; GPTQ trades element-wise error for lower output error on calibration data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from skillhub.operators import EncodeContext, Encoded, FieldLayout, meta_int
from skillhub.numerics.gptq import DEFAULT_DAMP, PreparedHessian, gptq_quantize, gptq_quantize_stacked, prepare_hessian
from skillhub.numerics.quantize import QUANT_BITS, QuantizedMatrix, packed_sizes, quantize_rtn
from skillhub.numerics.svd import truncated_svd
from skillhub.operators.builtin.rtn import as_matrix
from skillhub.io.tensorfile import dtype_from_name

def _matrix(delta: torch.Tensor, operator: str) -> torch.Tensor:
    if delta.dim() < 2:
        raise ValueError(f"operator {operator} needs a matrix, got a {delta.dim()}-D tensor; use raw for norms and biases")
    return delta.reshape(as_matrix(tuple(delta.shape)))


def _factor_tensors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    # LoRA layout: delta ~= B @ A with A = Vh (r x n) and B = U diag(S) (m x r).
    torch_dtype = dtype_from_name(dtype)
    return {"A": vh.to(torch_dtype).cpu(), "B": (u * s).to(torch_dtype).cpu()}


def _factor_fields(meta: Mapping[str, Any], params: Mapping[str, Any], shape: tuple[int, ...]) -> FieldLayout:
    m, n = _matrix_shape(shape)
    if meta.get("transposed", False) not in (True, False):
        raise ValueError("meta 'transposed' must be true or false")
    if meta.get("transposed"):
        m, n = n, m
    if not isinstance(meta.get("scaling", 1.0), (int, float)) or isinstance(meta.get("scaling"), bool):
        raise ValueError("meta 'scaling' must be a number")
    rank = meta_int(meta, "rank", 1, min(m, n))
    dtype = dtype_from_name(params["dtype"])
    return {"A": (dtype, (rank, n)), "B": (dtype, (m, rank))}


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) < 2:
        raise ValueError(f"a {len(shape)}-D module cannot hold SVD factors")
    return as_matrix(shape)


class _FactorOperator:
    """What ``svd`` and ``lowrank`` share: their data are LoRA-style float factors B @ A."""

    def expected_fields(self, meta: Mapping[str, Any], params: Mapping[str, Any], shape: tuple[int, ...], *,
                        version: str) -> FieldLayout:
        return _factor_fields(meta, params, shape)

    def decode(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], params: Mapping[str, Any],
               shape: tuple[int, ...], *, version: str) -> torch.Tensor:
        b, a = self.factors(tensors, meta, params, shape, version=version)
        return (b @ a).reshape(shape)

    def factors(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], params: Mapping[str, Any],
                shape: tuple[int, ...], *, version: str) -> tuple[torch.Tensor, torch.Tensor]:
        b, a = tensors["B"].to(torch.float32), tensors["A"].to(torch.float32)
        scaling = meta.get("scaling", 1.0)
        if scaling != 1.0:
            b = b * scaling
        # A PEFT adapter's factors kept as they are: fan_in_fan_out layers and embeddings hold the
        # transpose of the (first dimension, rest) delta.
        return (a.T, b.T) if meta.get("transposed") else (b, a)


class SVDOperator(_FactorOperator):
    """SVD truncated at the smallest rank keeping ``energy`` of the squared singular values."""

    name = "svd"
    version = "1.0"
    params_schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "energy": {
                "type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1.0,
                "description": "Fraction of sum(sigma^2) to keep; 1.0 keeps the numerical rank (full).",
            },
            "dtype": {"enum": ["float16", "bfloat16", "float32"], "default": "float16"},
        },
        "examples": [{"energy": 0.9}, {"energy": 1.0, "dtype": "float32"}],
    }

    def encode(self, delta: torch.Tensor, params: Mapping[str, Any], ctx: EncodeContext) -> Encoded:
        matrix = _matrix(delta, self.name)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)  # the threshold needs every sigma
        if params["energy"] >= 1.0:
            tolerance = s[0] * max(matrix.shape) * torch.finfo(torch.float32).eps if s.numel() else 0.0
            rank = int((s > tolerance).sum())
        else:
            energy = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
            rank = int(torch.searchsorted(energy, torch.tensor(params["energy"], dtype=torch.float64))) + 1
        rank = max(1, min(rank, s.numel()))
        return Encoded(tensors=_factor_tensors(u[:, :rank], s[:rank], vh[:rank], params["dtype"]), meta={"rank": rank})



class LowRankOperator(_FactorOperator):
    """Best rank-r approximation stored as float factors (what LoRA extraction produces).

    Since 1.1 the meta may also carry ``scaling`` (the delta is B @ A * scaling) and
    ``transposed`` (it is (B @ A)^T): a PEFT LoRA adapter imported with ``--from-peft`` keeps its
    factors bit for bit that way. Data of 1.0 has neither (scaling 1, not transposed)."""

    name = "lowrank"
    version = "1.1"
    params_schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "oneOf": [{"required": ["rank"]}, {"required": ["rank_fraction"]}],
        "properties": {
            "rank": {"type": "integer", "minimum": 1},
            "rank_fraction": {"type": "number", "exclusiveMinimum": 0, "maximum": 1,
                              "description": "Rank as a fraction of min(rows, cols)."},
            "dtype": {"enum": ["float16", "bfloat16", "float32"], "default": "float16"},
        },
        "examples": [{"rank": 8}, {"rank_fraction": 0.25, "dtype": "bfloat16"}],
    }

    def encode(self, delta: torch.Tensor, params: Mapping[str, Any], ctx: EncodeContext) -> Encoded:
        matrix = _matrix(delta, self.name)
        if "rank" in params:
            rank = params["rank"]
        else:
            rank = max(1, round(params["rank_fraction"] * min(matrix.shape)))
        u, s, vh = truncated_svd(matrix, rank, generator=ctx.generator())
        return Encoded(tensors=_factor_tensors(u, s, vh, params["dtype"]), meta={"rank": int(s.numel())})



def resolve_rank_groups(
    groups: list[list[int]], min_dim: int, reference_dim: int | None
) -> list[tuple[int, int]]:
    """Concrete (rank, bits) groups for a matrix whose smaller side is ``min_dim``.

    With ``reference_dim``, the group boundaries (cumulative ranks) written for a
    ``reference_dim``-wide model are scaled by ``min_dim / reference_dim`` and rounded, keeping
    every group at least one direction wide while room remains; ranks never exceed ``min_dim``.
    """
    scale = 1.0 if reference_dim is None else min_dim / reference_dim
    resolved: list[tuple[int, int]] = []
    previous = 0
    cumulative = 0
    for rank, bits in groups:
        cumulative += rank
        boundary = min(min_dim, max(previous + 1, round(cumulative * scale)))
        if boundary > previous:
            resolved.append((boundary - previous, bits))
            previous = boundary
    return resolved


class SVDMixedOperator:
    """Truncated SVD whose singular-vector groups are quantized at their own bit widths.

    Each singular vector (a column of U, a row of V^T) is quantized group-wise along its
    length, so scales stay shared over ``group_size`` entries even when a rank group holds a
    single direction. Singular values are stored in float16.

    With calibration statistics (and ``quantizer`` ``auto`` or ``gptq``) each rank group is
    quantized with GPTQ as in the paper's Eq. 8: first V^T_[r] against the layer input x, then
    U_[r] against its own input Sigma_[r] V^_[r]^T x, built from the already quantized V. Without
    calibration (or with ``quantizer: rtn``) factors are rounded to nearest.
    """

    name = "svd-mixed"
    version = "1.0"
    params_schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "required": ["groups"],
        "properties": {
            "groups": {
                "type": "array", "minItems": 1,
                "description": "[[rank, bits], ...] from the top singular direction down.",
                "items": {
                    "type": "array", "minItems": 2, "maxItems": 2,
                    "prefixItems": [{"type": "integer", "minimum": 1}, {"enum": list(QUANT_BITS)}],
                },
            },
            "reference_dim": {
                "type": ["integer", "null"], "minimum": 1, "default": None,
                "description": "Width the ranks were written for; ranks scale with min(rows, cols) / reference_dim.",
            },
            "group_size": {"type": "integer", "minimum": 1, "default": 128},
            "quantizer": {
                "enum": ["auto", "rtn", "gptq"], "default": "auto",
                "description": "auto: GPTQ when calibration statistics are available, else round-to-nearest.",
            },
            "act_order": {"type": "boolean", "default": False, "description": "GPTQ visits V columns by decreasing H_jj."},
            "damp": {"type": "number", "exclusiveMinimum": 0, "default": DEFAULT_DAMP},
        },
        "examples": [{"groups": [[4, 8], [12, 4], [16, 2]], "group_size": 64}, {"groups": [[8, 3]], "group_size": 32}],
    }

    def quantize_group(
        self, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, *, bits: int, params: Mapping[str, Any],
        hessian: PreparedHessian | None, v_quantized: QuantizedMatrix | None = None,
    ) -> tuple[QuantizedMatrix, QuantizedMatrix]:
        """Quantize one rank group: returns (U^T quantized, V^T quantized), both rank x length.

        ``v_quantized`` is V^T already quantized by GPTQ against ``hessian`` (with every other
        rank group, in one pass: see :meth:`encode`); made here otherwise."""
        group_size = params["group_size"]
        if hessian is None:
            return quantize_rtn(u.T, bits=bits, group_size=group_size), quantize_rtn(vh, bits=bits, group_size=group_size)
        options = {"bits": bits, "group_size": group_size, "damp": params["damp"]}
        if v_quantized is None:
            v_quantized = gptq_quantize(vh, hessian, **options)
        # Eq. 8: U's input is Sigma V^T x with the *quantized* V, so U absorbs V's error. Its Hessian
        # P H P^T comes from the buffer that holds V's factor (no second n x n copy of H).
        u_hessian = hessian.quadratic_form(s[:, None] * v_quantized.dequantize())
        return gptq_quantize(u, u_hessian, scale_axis="column", **options), v_quantized

    def encode(self, delta: torch.Tensor, params: Mapping[str, Any], ctx: EncodeContext) -> Encoded:
        matrix = _matrix(delta, self.name)
        use_gptq = ctx.calibration is not None and params["quantizer"] != "rtn"
        if params["quantizer"] == "gptq" and ctx.calibration is None:
            raise ValueError("quantizer 'gptq' needs calibration data (--calib)")
        transposed = use_gptq and ctx.calibration.transposed
        if transposed:  # GPT-2's Conv1D stores (in, out); Eq. 8 needs the (out, in) map of x
            matrix = matrix.T
        groups = resolve_rank_groups(params["groups"], min(matrix.shape), params["reference_dim"])
        rank = sum(r for r, _ in groups)
        u, s, vh = truncated_svd(matrix, rank, generator=ctx.generator())
        # Every rank group of V^T multiplies the layer input: one Hessian factorization (in the
        # Hessian's own storage where no other module reads it) and one GPTQ pass for them all.
        hessian = prepare_hessian(ctx.calibration.hessian, damp=params["damp"], act_order=params["act_order"],
                                  device=ctx.device, overwrite=ctx.calibration.exclusive) if use_gptq else None
        v_groups = gptq_quantize_stacked(vh, hessian, parts=groups, group_size=params["group_size"]) if use_gptq else None
        parts: dict[str, list[torch.Tensor]] = {f"{side}.{kind}": [] for side in "UV" for kind in ("codes", "scales", "zeros")}
        start = 0
        for index, (size, bits) in enumerate(groups):
            block = slice(start, start + size)
            quantized = self.quantize_group(u[:, block], s[block], vh[block], bits=bits, params=params,
                                            hessian=hessian, v_quantized=v_groups[index] if v_groups else None)
            for side, q in zip("UV", quantized):
                for kind, tensor in zip(("codes", "scales", "zeros"), q.packed()):
                    parts[f"{side}.{kind}"].append(tensor)
            start += size
        tensors = {"S": s.to(torch.float16).cpu()}
        tensors.update({key: torch.cat(chunks) for key, chunks in parts.items()})
        meta = {"rank": rank, "groups": [list(g) for g in groups], "quantizer": "gptq" if use_gptq else "rtn"}
        if transposed:
            meta["transposed"] = True
        return Encoded(tensors=tensors, meta=meta)

    def expected_fields(self, meta: Mapping[str, Any], params: Mapping[str, Any], shape: tuple[int, ...], *,
                        version: str) -> FieldLayout:
        m, n = _matrix_shape(shape)
        rank = meta_int(meta, "rank", 1, min(m, n))
        groups = meta.get("groups")
        if not isinstance(groups, list) or not groups or not all(
                isinstance(g, list) and len(g) == 2 and type(g[0]) is int and g[0] >= 1 and g[1] in QUANT_BITS
                for g in groups):
            raise ValueError(f"meta 'groups' must be [[rank >= 1, bits in {list(QUANT_BITS)}], ...]")
        if sum(r for r, _ in groups) != rank:
            raise ValueError(f"meta 'groups' add up to rank {sum(r for r, _ in groups)}, meta 'rank' says {rank}")
        if meta.get("transposed", False) not in (True, False):
            raise ValueError("meta 'transposed' must be true or false")
        if meta.get("transposed"):
            m, n = n, m
        fields: FieldLayout = {"S": (torch.float16, (rank,))}
        for side, length in (("U", m), ("V", n)):
            counts = [0, 0, 0]
            for size, bits in groups:
                counts = [c + k for c, k in zip(counts, packed_sizes(size, length, bits, params["group_size"]))]
            fields[f"{side}.codes"] = (torch.uint8, (counts[0],))
            fields[f"{side}.scales"] = (torch.float16, (counts[1],))
            fields[f"{side}.zeros"] = (torch.uint8, (counts[2],))
        return fields

    def decode(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], params: Mapping[str, Any],
               shape: tuple[int, ...], *, version: str) -> torch.Tensor:
        left, right = self._stored_factors(tensors, meta, params, shape)
        out = left @ right
        if meta.get("transposed"):
            out = out.T
        return out.reshape(shape)

    def factors(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], params: Mapping[str, Any],
                shape: tuple[int, ...], *, version: str) -> tuple[torch.Tensor, torch.Tensor]:
        left, right = self._stored_factors(tensors, meta, params, shape)
        if meta.get("transposed"):  # stored for the (out, in) map: the delta is its transpose
            return right.T, left.T
        return left, right

    def _stored_factors(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], params: Mapping[str, Any],
                        shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """U Sigma and V^T of every rank group, dequantized and concatenated."""
        m, n = as_matrix(shape)
        if meta.get("transposed"):
            m, n = n, m
        s = tensors["S"].to(torch.float32)
        left, right = [], []  # U Sigma and V^T, one block per rank group, multiplied once
        offsets = {key: 0 for key in tensors}
        start = 0
        for size, bits in meta["groups"]:
            factors = []
            for side, length in (("U", m), ("V", n)):
                sizes = packed_sizes(size, length, bits, params["group_size"])
                pieces = []
                for kind, count in zip(("codes", "scales", "zeros"), sizes):
                    key = f"{side}.{kind}"
                    pieces.append(tensors[key][offsets[key]: offsets[key] + count])
                    offsets[key] += count
                factors.append(QuantizedMatrix.from_packed(
                    *pieces, rows=size, cols=length, bits=bits, group_size=params["group_size"]).dequantize())
            u_t, vh = factors
            left.append(u_t.T * s[start:start + size])
            right.append(vh)
            start += size
        return torch.cat(left, dim=1), torch.cat(right)
