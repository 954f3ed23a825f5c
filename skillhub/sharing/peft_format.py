"""What PEFT's LoRA adapters look like on disk, shared by export and import.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys
are ``base_model.model.<module>.lora_A.weight`` (r x in), ``...lora_B.weight`` (out x r), for an
embedding ``...lora_embedding_A`` (r x vocab) and ``...lora_embedding_B`` (dim x r), with
``lora_bias`` a ``...lora_B.bias``, and for a module in ``modules_to_save`` its full parameters
``base_model.model.<module>.<parameter>``. The delta of a module is B @ A * scaling (transposed
for embeddings and ``fan_in_fan_out`` layers), scaling = alpha / r (alpha / sqrt(r) with rsLoRA),
with r and alpha taken per module from ``rank_pattern`` / ``alpha_pattern`` when they match.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"
LORA_SUFFIXES = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "embedding_A",
                 "lora_embedding_B": "embedding_B", "lora_B.bias": "bias"}


def pattern_key(patterns: Sequence[str], module: str) -> str | None:
    """The first key of ``rank_pattern``/``alpha_pattern`` that names ``module``, as PEFT matches them
    (a regex for the end of the module name, after a dot)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def module_scaling(config: Mapping[str, object], module: str, rank: int) -> float:
    """alpha / r of ``module`` (alpha / sqrt(r) with rsLoRA), alpha from ``alpha_pattern`` when it matches."""
    alphas = config.get("alpha_pattern") or {}
    key = pattern_key(list(alphas), module)
    alpha = float(alphas[key] if key is not None else config.get("lora_alpha", 8))
    return alpha / (rank ** 0.5 if config.get("use_rslora") else rank)


def split_key(key: str) -> tuple[str, str] | None:
    """(module, LoRA tensor kind) of an adapter key, or None for a full parameter (modules_to_save)."""
    for suffix, kind in LORA_SUFFIXES.items():
        if key.endswith("." + suffix):
            return key[len(PREFIX):-len(suffix) - 1], kind
    return None
