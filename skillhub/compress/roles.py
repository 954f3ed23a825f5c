"""Module roles of causal-LM parameters.

Every safetensors key of a Hugging Face causal LM is sorted into one of `ROLES`, so that
recipes can treat, say, embeddings differently from MLP weights, and so that reports can
group a delta's size by role. The rules are plain regex tables: one ordered list per model
family, then a generic list for everything the family list does not cover (and for model
types we have never seen). First match wins.

Only `re` is imported here: roles are needed when listing or validating packs, where
pulling in transformers or torch would cost seconds for nothing.
"""

from __future__ import annotations

import re

ROLES: tuple[str, ...] = ("embedding", "head", "attention", "mlp", "router", "norm", "bias", "other")

_Rules = tuple[tuple[re.Pattern[str], str], ...]


def _compile(rules: list[tuple[str, str]]) -> _Rules:
    return tuple((re.compile(pattern), role) for pattern, role in rules)


# MoE routers decide which experts run, so a small error in them changes which weights act at
# all: they get a role of their own, checked before anything else (the router's own bias and
# score-correction bias included). The module names transformers uses: Mixtral/Qwen-MoE/OLMoE/
# DeepSeek `mlp.gate` (`block_sparse_moe.gate` on disk for Mixtral), Qwen2-MoE/Qwen3-Next
# `mlp.shared_expert_gate`, GPT-OSS/Llama 4/Jamba `router`, DBRX `ffn.router.layer`. A dense
# model's gate projection is `gate_proj`/`gate_up_proj`, never a bare `gate` segment.
_ROUTER = re.compile(r"(^|\.)(mlp|block_sparse_moe|moe|feed_forward|ffn)\.(gate|router|shared_expert_gate)(\.|$)")

# Checked next, because a 1-D `.bias` is a bias whatever module owns it
# (GPT-2's ln_1.bias, Qwen2's q_proj.bias).
_BIAS = re.compile(r"(^|\.)bias$")

# Buffers that older transformers versions wrote into checkpoints: GPT-2/GPT-J/GPT-Neo's
# causal mask `attn.bias` (4-D, so it got past _BIAS) and `attn.masked_bias` (a scalar), and
# llama's `rotary_emb.inv_freq`. They are recomputed at load time and never trained, so
# they must not land in "attention", where a recipe would try to compress a delta on them.
_BUFFERS = _compile(
    [
        (r"(^|\.)(attn|attention)\.(masked_)?bias$", "other"),
        (r"(^|\.)rotary_emb\.inv_freq$", "other"),
    ]
)

# Llama layout, shared by mistral/mixtral, qwen2/qwen3 (+MoE), gemma 1-3 and phi3. Module
# prefixes rather than projection names, so phi3's fused qkv_proj/gate_up_proj and the MoE
# routers and fused experts (`mlp.experts.gate_up_proj`, no `.weight`) need no rules of their own.
_LLAMA = _compile(
    [
        (r"(^|\.)embed_tokens\.weight$", "embedding"),
        (r"(^|\.)lm_head\.weight$", "head"),
        # Before attention: qwen3/gemma3 keep q_norm/k_norm inside self_attn, and
        # "post_attention_layernorm" would otherwise read as attention. Also covers gemma2's
        # pre/post_feedforward_layernorm.
        (r"(^|\.)\w*norm\.weight$", "norm"),
        (r"(^|\.)self_attn\.", "attention"),
        (r"(^|\.)(mlp|block_sparse_moe)\.", "mlp"),
    ]
)

# GPT-2 scopes by parent module because `c_proj` exists under both attn and mlp. Keys may
# or may not carry the `transformer.` prefix (the original openai-community checkpoints don't).
_GPT2 = _compile(
    [
        (r"(^|\.)(wte|wpe)\.weight$", "embedding"),
        (r"(^|\.)lm_head\.weight$", "head"),
        (r"(^|\.)ln_\w+\.weight$", "norm"),
        (r"(^|\.)(attn|crossattention)\.", "attention"),
        (r"(^|\.)mlp\.", "mlp"),
    ]
)

# Name heuristics for unknown model types, and the safety net behind each family table.
# Names match whole dotted segments only, so "ln" means ln_1/ln_f, not any key containing "ln".
_GENERIC = _compile(
    [
        # Head before embedding: GPT-NeoX calls its head "embed_out".
        (r"(^|\.)(lm_head|embed_out)(\.|$)", "head"),
        # Meta's original llama layout; anchored because "output" is a common submodule name.
        (r"^(model\.)?output\.weight$", "head"),
        # Before embedding and attention, for bloom's "word_embeddings_layernorm",
        # "post_attention_layernorm" and "attention_norm".
        (r"(^|\.)(\w*norm\w*|ln(_\w+)?)(\.|$)", "norm"),
        (r"(^|\.)(\w*embed\w*|wte|wpe)(\.|$)", "embedding"),
        (
            r"(^|\.)(\w*attn\w*|\w*attention\w*|(q|k|v|o|qkv)_proj|query_key_value)(\.|$)",
            "attention",
        ),
        (
            r"(^|\.)(\w*mlp\w*|\w*ffn\w*|feed_?forward|\w*moe\w*|experts|fc[12]|fc_in|fc_out|c_fc"
            r"|(gate|up|down|gate_up)_proj|dense_h_to_4h|dense_4h_to_h)(\.|$)",
            "mlp",
        ),
    ]
)

_FAMILY_OF: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2": "llama",
    "qwen2_moe": "llama",
    "qwen3": "llama",
    "qwen3_moe": "llama",
    "gemma": "llama",
    "gemma2": "llama",
    "gemma3": "llama",
    "gemma3_text": "llama",
    "phi3": "llama",
    "gpt2": "gpt2",
}

_CHAINS: dict[str | None, _Rules] = {
    "llama": _BUFFERS + _LLAMA + _GENERIC,
    "gpt2": _BUFFERS + _GPT2 + _GENERIC,
    None: _BUFFERS + _GENERIC,
}

# Roles whose operators factor or prune a matrix (SVD, magnitude pruning of rows).
MATRIX_ROLES = ("embedding", "head", "attention", "mlp")
# Roles whose matrices act on a layer's input, so that calibration statistics exist for them.
CALIBRATED_ROLES = ("attention", "mlp", "head")
# Learned tensors that are not matrices of a layer, whatever module owns them: the weight of a
# norm at any shape (Cohere's per-head q_norm/k_norm are 2-D) and convolution kernels (Qwen3-Next's
# conv1d, 3-D). Vectors and scalars never get a matrix role either (GPT-OSS attention sinks,
# Qwen3-Next's A_log and dt_bias, DeepSeek-V3's e_score_correction_bias): see role_of.
_NOT_A_MATRIX = re.compile(r"(^|\.)(\w*norm|conv\w*)\.weight$")
# Biases of fused 3-D experts, one row per expert (GPT-OSS's experts.gate_up_proj_bias).
_EXPERT_BIAS = re.compile(r"(^|\.)experts\.\w+_bias$")


def _family(model_type: str | None) -> str | None:
    return _FAMILY_OF.get(model_type.lower()) if model_type else None


def role_of(name: str, *, model_type: str | None, ndim: int) -> str:
    """Classify one checkpoint parameter into a module role.

    Args:
        name: The safetensors key, e.g. ``"model.layers.3.mlp.up_proj.weight"``.
        model_type: ``model_type`` from the checkpoint's config.json. ``None`` or a type
            without a family table falls back to the generic name rules.
        ndim: The tensor's number of dimensions.

    Returns:
        One of `ROLES`; ``"other"`` when no rule matches.
    """
    if _ROUTER.search(name):
        return "router"
    if ndim == 1 and _BIAS.search(name) or ndim == 2 and _EXPERT_BIAS.search(name):
        return "bias"
    if ndim > 1 and _NOT_A_MATRIX.search(name):
        return "other"
    for pattern, role in _CHAINS[_family(model_type)]:
        # Norm layers only own vectors; a matrix whose path mentions "norm" is something
        # else and should fall through to the later rules.
        if role == "norm" and ndim > 1:
            continue
        if pattern.search(name):
            return "other" if ndim < 2 and role in MATRIX_ROLES else role
    return "other"
