"""Tests for skillhub.compress.roles against real transformers model layouts.

The models are built on the meta device: only parameter names and shapes matter here,
and meta tensors have both without allocating or initialising anything.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from skillhub.compress.roles import MATRIX_ROLES, ROLES, role_of

# In-vocab special tokens: the defaults (32000, 50256...) are outside a 64-token vocab,
# which phi3 rejects outright and the others warn about.
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    **_TOKENS,
)

CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "llama": lambda: transformers.LlamaConfig(**_DECODER),
    "mistral": lambda: transformers.MistralConfig(**_DECODER),
    "qwen2": lambda: transformers.Qwen2Config(**_DECODER),
    "gemma": lambda: transformers.GemmaConfig(head_dim=8, **_DECODER),
    "gemma2": lambda: transformers.Gemma2Config(head_dim=8, **_DECODER),
    "phi3": lambda: transformers.Phi3Config(**_DECODER),
    "gpt2": lambda: transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=64, **_TOKENS
    ),
    # Beyond the core seven: q_norm/k_norm inside self_attn, and fused MoE experts whose
    # keys have no ".weight" suffix.
    "qwen3": lambda: transformers.Qwen3Config(head_dim=8, **_DECODER),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(head_dim=8, **_DECODER),
    "mixtral": lambda: transformers.MixtralConfig(num_local_experts=2, **_DECODER),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        num_experts=2, moe_intermediate_size=16, **_DECODER
    ),
}

# Families with learned tensors that are not a layer's matrices: attention sinks and fused expert
# biases (GPT-OSS), linear-attention A_log/dt_bias and a conv1d kernel (Qwen3-Next), 2-D per-head
# q/k norms (Cohere), the router's score-correction bias (DeepSeek-V3).
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=16)
NON_MATRIX_CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "gpt_oss": lambda: transformers.GptOssConfig(num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                                                 layer_types=["sliding_attention", "full_attention"],
                                                 sliding_window=8, **_DECODER),
    "qwen3_next": lambda: transformers.Qwen3NextConfig(
        num_experts=4, shared_expert_intermediate_size=16, head_dim=8, linear_num_value_heads=4,
        linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
        layer_types=["linear_attention", "full_attention"], **_MOE, **_DECODER),
    "cohere": lambda: transformers.CohereConfig(use_qk_norm=True, **_DECODER),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1, **_MOE, **_DECODER),
}
NON_MATRIX_CHECKS = [
    ("gpt_oss", "model.layers.0.self_attn.sinks", "other"),
    ("gpt_oss", "model.layers.0.mlp.experts.gate_up_proj_bias", "bias"),
    ("gpt_oss", "model.layers.1.mlp.experts.down_proj_bias", "bias"),
    ("gpt_oss", "model.layers.0.mlp.experts.gate_up_proj", "mlp"),
    ("qwen3_next", "model.layers.0.linear_attn.A_log", "other"),
    ("qwen3_next", "model.layers.0.linear_attn.dt_bias", "other"),
    ("qwen3_next", "model.layers.0.linear_attn.conv1d.weight", "other"),
    ("qwen3_next", "model.layers.0.linear_attn.in_proj_qkvz.weight", "attention"),
    ("cohere", "model.layers.0.self_attn.q_norm.weight", "other"),
    ("cohere", "model.layers.1.self_attn.k_norm.weight", "other"),
    ("cohere", "model.layers.0.self_attn.q_proj.weight", "attention"),
    ("deepseek_v3", "model.layers.1.mlp.gate.e_score_correction_bias", "router"),
    ("deepseek_v3", "model.layers.1.mlp.gate.weight", "router"),
    ("gpt_oss", "model.layers.0.mlp.router.weight", "router"),
    ("gpt_oss", "model.layers.0.mlp.router.bias", "router"),
    ("qwen3_next", "model.layers.0.mlp.gate.weight", "router"),
    ("qwen3_next", "model.layers.0.mlp.shared_expert_gate.weight", "router"),
    ("deepseek_v3", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "attention"),
]

_LLAMA_CHECKS = [
    ("model.embed_tokens.weight", "embedding"),
    ("lm_head.weight", "head"),
    ("model.norm.weight", "norm"),
    ("model.layers.0.input_layernorm.weight", "norm"),
    ("model.layers.1.post_attention_layernorm.weight", "norm"),
    ("model.layers.0.self_attn.q_proj.weight", "attention"),
    ("model.layers.1.self_attn.o_proj.weight", "attention"),
    ("model.layers.0.mlp.gate_proj.weight", "mlp"),
    ("model.layers.1.mlp.down_proj.weight", "mlp"),
]

SPOT_CHECKS: dict[str, list[tuple[str, str]]] = {
    "llama": _LLAMA_CHECKS,
    "mistral": _LLAMA_CHECKS,
    "qwen2": _LLAMA_CHECKS
    + [
        ("model.layers.0.self_attn.q_proj.bias", "bias"),
        ("model.layers.1.self_attn.v_proj.bias", "bias"),
    ],
    "gemma": _LLAMA_CHECKS,
    "gemma2": _LLAMA_CHECKS
    + [
        ("model.layers.0.pre_feedforward_layernorm.weight", "norm"),
        ("model.layers.1.post_feedforward_layernorm.weight", "norm"),
    ],
    "phi3": [
        ("model.embed_tokens.weight", "embedding"),
        ("lm_head.weight", "head"),
        ("model.norm.weight", "norm"),
        ("model.layers.0.self_attn.qkv_proj.weight", "attention"),
        ("model.layers.0.self_attn.o_proj.weight", "attention"),
        ("model.layers.0.mlp.gate_up_proj.weight", "mlp"),
        ("model.layers.1.mlp.down_proj.weight", "mlp"),
    ],
    "gpt2": [
        ("transformer.wte.weight", "embedding"),
        ("transformer.wpe.weight", "embedding"),
        ("lm_head.weight", "head"),
        ("transformer.h.0.ln_1.weight", "norm"),
        ("transformer.h.1.ln_2.weight", "norm"),
        ("transformer.ln_f.weight", "norm"),
        ("transformer.ln_f.bias", "bias"),
        ("transformer.h.0.attn.c_attn.weight", "attention"),
        ("transformer.h.0.attn.c_attn.bias", "bias"),
        ("transformer.h.0.attn.c_proj.weight", "attention"),
        ("transformer.h.0.mlp.c_fc.weight", "mlp"),
        ("transformer.h.0.mlp.c_proj.weight", "mlp"),
    ],
    "qwen3": [
        ("model.layers.0.self_attn.q_norm.weight", "norm"),
        ("model.layers.1.self_attn.k_norm.weight", "norm"),
    ],
    "gemma3_text": [
        ("model.layers.0.self_attn.q_norm.weight", "norm"),
        ("model.layers.0.pre_feedforward_layernorm.weight", "norm"),
    ],
    # MoE routers have a role of their own; a dense model's gate projection stays mlp.
    "mixtral": [
        ("model.layers.0.mlp.gate.weight", "router"),
        ("model.layers.0.mlp.experts.gate_up_proj", "mlp"),
    ],
    "qwen3_moe": [("model.layers.1.mlp.experts.down_proj", "mlp"), ("model.layers.1.mlp.gate.weight", "router")],
}

_STATE_SHAPES: dict[str, dict[str, torch.Size]] = {}


def state_shapes(model_type: str) -> dict[str, torch.Size]:
    """Parameter names and shapes of a tiny meta-device model, built once per type."""
    if model_type not in _STATE_SHAPES:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config({**CONFIGS, **NON_MATRIX_CONFIGS}[model_type]())
        assert model.config.model_type == model_type
        _STATE_SHAPES[model_type] = {k: v.shape for k, v in model.state_dict().items()}
    return _STATE_SHAPES[model_type]


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_every_parameter_has_a_known_role(model_type: str) -> None:
    roles = {
        name: role_of(name, model_type=model_type, ndim=len(shape))
        for name, shape in state_shapes(model_type).items()
    }
    assert set(roles.values()) <= set(ROLES)
    assert [name for name, role in roles.items() if role == "other"] == []
    # Every family here has all of these; a missing one means a rule swallowed another.
    assert {"embedding", "head", "attention", "mlp", "norm"} <= set(roles.values())


@pytest.mark.parametrize("model_type", sorted({**CONFIGS, **NON_MATRIX_CONFIGS}))
def test_only_matrices_get_matrix_roles(model_type: str) -> None:
    """Operators of matrix roles (SVD, row pruning) refuse anything else: `create` failed on
    GPT-OSS and Qwen3-Next before, and compressed Cohere's q/k norms as attention matrices."""
    for name, shape in state_shapes(model_type).items():
        role = role_of(name, model_type=model_type, ndim=len(shape))
        if role in MATRIX_ROLES:
            assert len(shape) >= 2 and not name.endswith(("norm.weight", "conv1d.weight")), (name, shape, role)


@pytest.mark.parametrize(
    ("model_type", "name", "role"),
    [(mt, name, role) for mt, checks in SPOT_CHECKS.items() for name, role in checks] + NON_MATRIX_CHECKS,
)
def test_spot_checks(model_type: str, name: str, role: str) -> None:
    shapes = state_shapes(model_type)
    assert name in shapes, f"{name} is not a {model_type} key; the fixture drifted"
    assert role_of(name, model_type=model_type, ndim=len(shapes[name])) == role


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_generic_rules_agree_on_known_layouts(model_type: str) -> None:
    """A checkpoint whose config lacks a known model_type must not be misread."""
    for name, shape in state_shapes(model_type).items():
        family = role_of(name, model_type=model_type, ndim=len(shape))
        generic = role_of(name, model_type=None, ndim=len(shape))
        assert generic == family, name


@pytest.mark.parametrize("model_type", [None, "totally_new_arch"])
@pytest.mark.parametrize(
    ("name", "ndim", "role"),
    [
        # Meta's original llama layout.
        ("tok_embeddings.weight", 2, "embedding"),
        ("output.weight", 2, "head"),
        ("layers.0.attention.wq.weight", 2, "attention"),
        ("layers.0.feed_forward.w1.weight", 2, "mlp"),
        ("layers.0.attention_norm.weight", 1, "norm"),
        ("layers.0.ffn_norm.weight", 1, "norm"),
        # GPT-NeoX: the head is called embed_out and must not read as an embedding.
        ("gpt_neox.embed_in.weight", 2, "embedding"),
        ("embed_out.weight", 2, "head"),
        ("gpt_neox.layers.0.attention.query_key_value.weight", 2, "attention"),
        ("gpt_neox.layers.0.attention.query_key_value.bias", 1, "bias"),
        ("gpt_neox.layers.0.post_attention_layernorm.weight", 1, "norm"),
        ("gpt_neox.layers.0.mlp.dense_h_to_4h.weight", 2, "mlp"),
        ("gpt_neox.final_layer_norm.bias", 1, "bias"),
        # Qwen3-style q_norm sits inside the attention block but is still a norm.
        ("model.layers.0.self_attn.q_norm.weight", 1, "norm"),
        ("model.layers.0.block_sparse_moe.experts.3.w2.weight", 2, "mlp"),
        ("model.layers.0.mlp.experts.gate_up_proj", 3, "mlp"),
        # Routers as saved: Mixtral on disk, DBRX, Jamba/Llama 4; never a dense gate projection.
        ("model.layers.0.block_sparse_moe.gate.weight", 2, "router"),
        ("transformer.blocks.0.ffn.router.layer.weight", 2, "router"),
        ("model.layers.3.feed_forward.router.weight", 2, "router"),
        ("model.layers.0.mlp.gate_proj.weight", 2, "mlp"),
        ("model.layers.0.mlp.gate_up_proj.weight", 2, "mlp"),
        ("transformer.h.0.ln_1.weight", 1, "norm"),
        # Saved buffers, not parameters: a 4-D causal mask and llama's inv_freq.
        ("transformer.h.0.attn.bias", 4, "other"),
        ("transformer.h.0.attn.masked_bias", 0, "other"),
        ("model.layers.0.self_attn.rotary_emb.inv_freq", 1, "other"),
        # A matrix is never a norm weight, whatever its path says.
        ("model.norm.weight", 2, "other"),
        ("model.logit_scale", 1, "other"),
        ("vision.patch_conv.weight", 4, "other"),
    ],
)
def test_generic_fallback(model_type: str | None, name: str, ndim: int, role: str) -> None:
    assert role_of(name, model_type=model_type, ndim=ndim) == role


@pytest.mark.parametrize(
    ("name", "ndim", "role"),
    [
        # Pre-4.x GPT-2 checkpoints saved the causal mask next to the weights.
        ("h.0.attn.bias", 4, "other"),
        ("h.0.attn.masked_bias", 0, "other"),
        ("h.0.attn.c_attn.bias", 1, "bias"),
        ("h.0.ln_1.weight", 1, "norm"),
        ("wte.weight", 2, "embedding"),
    ],
)
def test_gpt2_unprefixed_checkpoint(name: str, ndim: int, role: str) -> None:
    assert role_of(name, model_type="gpt2", ndim=ndim) == role


def test_roles_tuple() -> None:
    assert ROLES == ("embedding", "head", "attention", "mlp", "router", "norm", "bias", "other")
