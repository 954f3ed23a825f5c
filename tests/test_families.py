"""Families whose learned tensors are not all a layer's matrices, end to end: a tiny model from the
family's `transformers` config, fine-tuned for a few steps, packed with the paper recipe from the
checkpoint as saved on disk, applied, loaded with `from_pretrained` and compared with the fine-tune.

Before, `create` failed on GPT-OSS (attention sinks) and Qwen3-Next (A_log, dt_bias) with
"svd-mixed needs a matrix", and compressed Cohere's 2-D q/k norms as attention matrices.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from skillhub import create_pack
from skillhub.activation import apply_packs
from skillhub.compress.roles import MATRIX_ROLES
from skillhub.demo.synthetic import build_tokenizer
from skillhub.progress import quiet_transformers

_COMMON = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"]),
    "qwen3_next": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32, head_dim=16, linear_num_value_heads=4,
                       linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                       layer_types=["linear_attention", "full_attention"]),
    "cohere": dict(use_qk_norm=True, head_dim=16),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1),
}
# Saved tensors that must be stored as they are (role: expected), per family.
NOT_MATRICES = {
    "gpt_oss": {"model.layers.0.self_attn.sinks": "other", "model.layers.0.mlp.experts.gate_up_proj_bias": "bias"},
    "qwen3_next": {"model.layers.0.linear_attn.A_log": "other", "model.layers.0.linear_attn.dt_bias": "other",
                   "model.layers.0.linear_attn.conv1d.weight": "other"},
    "cohere": {"model.layers.0.self_attn.q_norm.weight": "other", "model.layers.1.self_attn.k_norm.weight": "other"},
    "deepseek_v3": {},
}


def _fine_tune(family: str, extra: dict, root: Path) -> tuple[Path, Path]:
    config = AutoConfig.for_model(family, **_COMMON, **extra)
    torch.manual_seed(0)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(root / "base")
    build_tokenizer().save_pretrained(root / "base")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(3):
        ids = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with quiet_transformers():
        model.save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


def _logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pack_apply_and_load(family: str, tmp_path: Path) -> None:
    base, tuned = _fine_tune(family, FAMILIES[family], tmp_path)
    pack = create_pack(base, tuned, tmp_path / "pack", task="t")
    modules = pack.manifest["modules"]
    for name, role in NOT_MATRICES[family].items():
        assert modules[name]["role"] == role and modules[name]["operator"] == "raw", (name, modules[name]["role"])
    for name, entry in modules.items():
        if entry["role"] in MATRIX_ROLES:
            assert len(entry["shape"]) >= 2, (name, entry["shape"])
    applied = apply_packs(base, [pack], tmp_path / "applied")
    ids = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(99))
    before, after, got = _logits(base, ids), _logits(tuned, ids), _logits(applied, ids)
    # The pack brings back most of what the fine-tune changed (0.17-0.40 measured; 1.0 = nothing).
    assert ((got - after).norm() / (after - before).norm()).item() < 0.6


# Saved under other names than in memory: transformers 5 fuses per-expert weights into 3-D tensors
# on load (Mixtral's block_sparse_moe.experts.E.w1 -> mlp.experts.gate_up_proj[E]) and renames
# (GPT-NeoX's embed_out -> lm_head). The registry's eval path patches and fingerprints loaded models.
RENAMED = {
    "mixtral": dict(num_local_experts=3),
    "qwen2_moe": dict(num_experts=3, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32),
    "gpt_neox": dict(),
    "deepseek_v3": FAMILIES["deepseek_v3"],  # multi-head latent attention, shared experts, fused routed experts
}


@pytest.mark.parametrize("family", sorted(RENAMED))
def test_the_eval_path_sees_the_model_as_saved(family: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from skillhub.registry import Registry

    base, tuned = _fine_tune(family, RENAMED[family], tmp_path)
    on_disk = load_file(base / "model.safetensors")
    pack = create_pack(base, tuned, tmp_path / "pack", task="t")
    registry = Registry(tmp_path / "registry")
    entry = registry.add(pack, task="t", base_location=str(base))
    model, _, _ = registry.load_base_model()  # its fingerprint check reads the model as saved
    in_memory = dict(model.state_dict())
    assert set(on_disk) != set(in_memory)  # the names really differ
    ids = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    applied = _logits(apply_packs(base, [pack], tmp_path / "applied"), ids)
    with registry.activated(model, packs=[entry.id]), torch.no_grad():
        patched = model(input_ids=ids).logits
    assert torch.allclose(patched, applied, atol=1e-5, rtol=0)  # patched in memory == written to disk
    assert all(torch.equal(model.state_dict()[k], t) for k, t in in_memory.items())  # restored exactly
    registry.remove(entry.id)
