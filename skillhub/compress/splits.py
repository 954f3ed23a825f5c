"""Which checkpoint tensors are several matrices, and where to cut them (see
:mod:`skillhub.operators.parts` for how a split module is stored).

- Experts stored as one 3-D tensor (GPT-OSS natively; Qwen3-MoE and others when saved fused) are
  always cut into their experts: one SVD across experts flattened to E x (a*b) has a rank bounded
  by E and costs more for the same error.
- Fused projections are cut when the recipe asks (``split_fused``, on in the paper recipe), by the
  config's head counts and sizes, so q, k and v (or gate and up) each get a matrix's rank instead of
  sharing one: Phi-3/Phi-4's ``qkv_proj`` and ``gate_up_proj``, GPT-2's ``c_attn``. Interleaved
  layouts (GPT-NeoX's and Falcon's ``query_key_value`` hold q, k, v per head) are left whole.

Only ``re`` and the parts type are needed: no model is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from skillhub.operators.parts import Split

# Roles whose tensors are layer matrices an operator may factor.
_SPLIT_ROLES = ("attention", "mlp")


def _head_dim(config: Mapping[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _qkv_rows(config: Mapping[str, Any]) -> list[int]:
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    return [heads * _head_dim(config), kv_heads * _head_dim(config), kv_heads * _head_dim(config)]


# model_type -> [(checkpoint name pattern, axis, sizes from config)]
_FUSED: dict[str, list[tuple[re.Pattern[str], int, Callable[[Mapping[str, Any]], list[int]]]]] = {
    "phi3": [
        (re.compile(r"(^|\.)self_attn\.qkv_proj\.weight$"), 0, _qkv_rows),
        (re.compile(r"(^|\.)mlp\.gate_up_proj\.weight$"), 0, lambda c: [c["intermediate_size"]] * 2),
    ],
    # GPT-2's Conv1D stores (in, out): q, k and v are column blocks.
    "gpt2": [(re.compile(r"(^|\.)attn\.c_attn\.weight$"), 1, lambda c: [c["n_embd"]] * 3)],
}


def split_for(name: str, *, role: str, shape: tuple[int, ...], config: Mapping[str, Any],
              fused: bool) -> Split | None:
    """How ``name`` is cut into matrices, or None to store it whole.

    Args:
        name: Checkpoint name.
        role: Its role (only attention and MLP tensors are cut).
        shape: Its shape on disk.
        config: The checkpoint's config.json.
        fused: Cut fused projections too (a recipe's ``split_fused``).
    """
    if role not in _SPLIT_ROLES:
        return None
    if len(shape) == 3 and shape[0] > 1:
        return Split.experts(shape[0])
    if not fused or len(shape) != 2:
        return None
    for pattern, axis, sizes_of in _FUSED.get(config.get("model_type") or "", []):
        if pattern.search(name):
            try:
                sizes = sizes_of(config)
            except (KeyError, TypeError, ZeroDivisionError):
                return None  # a config without the sizes: keep it whole
            return Split(axis=axis, sizes=tuple(sizes)) if sum(sizes) == shape[axis] else None
    return None
