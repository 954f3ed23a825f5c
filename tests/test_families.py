"""Every decoder family users fine-tune today, end to end: a tiny model from the family's
`transformers` config, fine-tuned for a few steps, then what a user does with it: `create` with and
without calibration from the checkpoint as saved on disk, `apply` and `from_pretrained`, and the
registry's `add` with an eval set, `activate`, `eval` and `remove`. Plus calibration's Hessians,
layer by layer, against hooks on one plain forward of the whole model.

Before issue 15: `create` failed on GPT-OSS (attention sinks) and Qwen3-Next (A_log, dt_bias) with
"svd-mixed needs a matrix"; Cohere's 2-D q/k norms and every MoE router were SVD-quantized; the eval
path failed on Mixtral, Qwen2/3-MoE, DeepSeek-V3 and GPT-NeoX ("not the registered base"); 26 of
34 SVD tensors fell back to round-to-nearest under --calib on Mixtral; calibration replayed layer
0's mask and rotary embeddings in every layer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from skillhub import create_pack
from skillhub.activation import apply_packs
from skillhub.compress.recipe import PAPER_RECIPE
from skillhub.compress.roles import MATRIX_ROLES
from skillhub.demo.synthetic import build_tokenizer
from skillhub.io.checkpoint import open_checkpoint
from skillhub.progress import quiet_transformers

from conftest import hessians_agree, plain_model

_COMMON = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_LOCAL_GLOBAL = dict(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
# Dense; sliding and global attention mixed (Mistral, Gemma 2/3, GPT-OSS); fused projections (Phi-3,
# GPT-2, GPT-NeoX); tied heads (Gemma, GPT-2); MoE saved per expert (Mixtral, Qwen2/3-MoE,
# DeepSeek-V3, renamed and fused into 3-D tensors on load) or 3-D (GPT-OSS); multi-head latent
# attention (DeepSeek-V3); linear attention (Qwen3-Next); per-head 2-D q/k norms (Cohere).
MATRIX = {
    "llama": {}, "mistral": dict(sliding_window=8), "qwen2": {}, "qwen3": dict(head_dim=16),
    "gemma": dict(head_dim=16), "gemma2": _LOCAL_GLOBAL, "gemma3_text": _LOCAL_GLOBAL, "phi3": {}, "gpt2": {},
    "gpt_neox": {}, "cohere": dict(use_qk_norm=True, head_dim=16),
    "mixtral": dict(num_local_experts=3),
    "qwen2_moe": dict(num_experts=3, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
                        num_key_value_heads=4),  # multi-head latent attention: as many kv heads as heads
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, **_LOCAL_GLOBAL),
    "qwen3_next": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32, head_dim=16, linear_num_value_heads=4,
                       linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                       layer_types=["linear_attention", "full_attention"]),
}
# Saved tensors that must be stored as they are (role: expected), per family.
NOT_MATRICES = {
    "gpt_oss": {"model.layers.0.self_attn.sinks": "other", "model.layers.0.mlp.experts.gate_up_proj_bias": "bias"},
    "qwen3_next": {"model.layers.0.linear_attn.A_log": "other", "model.layers.0.linear_attn.dt_bias": "other",
                   "model.layers.0.linear_attn.conv1d.weight": "other"},
    "cohere": {"model.layers.0.self_attn.q_norm.weight": "other", "model.layers.1.self_attn.k_norm.weight": "other"},
}
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "qwen3_next")
# Per-expert checkpoint names of an expert's first projection(s), whose input is the tokens routed to it.
_EXPERT_INPUT = re.compile(r"\.experts\.(\d+)\.(w1|w3|gate_proj|up_proj)\.weight$")


def _fine_tune(family: str, extra: dict, root: Path) -> tuple[Path, Path]:
    config = AutoConfig.for_model(family, **{**_COMMON, **extra})
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
    build_tokenizer().save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


def _logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _svd_quantizers(pack) -> dict[str, str]:
    """How each SVD-compressed matrix (each part of a split one) was quantized: gptq or rtn."""
    found = {}
    for name, entry in pack.manifest["modules"].items():
        if entry["operator"] == "svd-mixed":
            for part, meta in enumerate(entry["meta"].get("parts", [entry["meta"]])):
                found[f"{name}#{part}" if "split" in entry else name] = meta["quantizer"]
    return found


@pytest.mark.parametrize("family", sorted(MATRIX))
def test_every_family_end_to_end(family: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from skillhub.evaluation.forgetting import add_and_score, evaluate_tasks
    from skillhub.registry import Registry

    base, tuned = _fine_tune(family, MATRIX[family], tmp_path)
    pack = create_pack(base, tuned, tmp_path / "pack", task="t")
    modules = pack.manifest["modules"]
    for name, role in NOT_MATRICES.get(family, {}).items():
        assert modules[name]["role"] == role and modules[name]["operator"] == "raw", (name, modules[name]["role"])
    for name, entry in modules.items():
        if entry["role"] in MATRIX_ROLES:
            assert len(entry["shape"]) >= 2, (name, entry["shape"])
        if entry["role"] == "router":  # stored as they are: 0.02-0.03% error from float16 (0.28-0.33 SVD'd)
            assert entry["operator"] == "raw" and entry["error"] < 1e-3, (name, entry["operator"], entry["error"])
    assert any(entry["role"] == "router" for entry in modules.values()) == (family in MOE)

    # apply, then from_pretrained: the pack brings back most of what the fine-tune changed.
    ids = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(99))
    before, after = _logits(base, ids), _logits(tuned, ids)
    applied = _logits(apply_packs(base, [pack], tmp_path / "applied"), ids)
    assert ((applied - after).norm() / (after - before).norm()).item() < 0.6  # 1.0 = nothing brought back

    # With calibration, every SVD'd matrix (every expert, every part) is quantized by GPTQ.
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{i % 37} {i}" for i in range(2000)))
    calibrated = create_pack(base, tuned, tmp_path / "calibrated", task="t", calib=calib, calib_samples=4,
                             calib_seqlen=32)
    quantizers = _svd_quantizers(calibrated)
    assert quantizers and set(quantizers.values()) == {"gptq"}, sorted(n for n, q in quantizers.items() if q != "gptq")
    assert "uncalibrated" not in calibrated.manifest["quantizer"]

    # The registry: add with an eval set, activate in memory (== apply on disk), eval, remove.
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"prompt": f"{w}=", "answer": w[::-1]}) + "\n"
                                 for w in ("abc", "xyz", "hello")))
    registry = Registry(tmp_path / "registry")
    scored = add_and_score(registry, pack, task="t", base_location=str(base), eval_file=eval_file)
    assert {record["task"] for record in scored.scores} == {"t"}
    model, _, _ = registry.load_base_model()  # its fingerprint check reads the model as saved
    in_memory = dict(model.state_dict())
    if family in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_neox"):
        assert set(load_file(base / "model.safetensors")) != set(in_memory)  # saved under other names
    with registry.activated(model, packs=[scored.entry.id]), torch.no_grad():
        patched = model(input_ids=ids).logits
    assert torch.allclose(patched, applied, atol=1e-5, rtol=0)
    assert all(torch.equal(model.state_dict()[k], t) for k, t in in_memory.items())  # restored exactly
    assert {record["task"] for record in evaluate_tasks(registry)} == {"t"}
    registry.remove(scored.entry.id)
    with registry.activated(model, packs=[]), torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def _plain_forward_statistics(model: torch.nn.Module, windows: torch.Tensor) -> dict[object, tuple[torch.Tensor, int]]:
    """The oracle: (X^T X, n) of every nn.Linear/Conv1D input, keyed by weight name, and of the tokens
    routed to each expert, keyed by (experts module, expert), and of all tokens reaching the experts
    module, keyed by (experts module, None), from hooks on one plain forward."""
    sums: dict[object, tuple[torch.Tensor, int]] = {}

    def add(key: object, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        total, count = sums.get(key, (0, 0))
        sums[key] = (total + x.T @ x, count + x.shape[0])

    def routed(name: str, experts: int):
        def hook(module, args, kwargs) -> None:
            values = [*args, *kwargs.values()]
            hidden = values[0].reshape(-1, values[0].shape[-1])
            index = next(v for v in values[1:] if isinstance(v, torch.Tensor) and not v.is_floating_point())
            add((name, None), hidden)
            for expert in range(experts):
                add((name, expert), hidden[(index.reshape(hidden.shape[0], -1) == expert).any(-1)])
        return hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            handles.append(module.register_forward_pre_hook(lambda m, a, key=f"{name}.weight": add(key, a[0])))
        elif isinstance(getattr(module, "gate_up_proj", None), torch.nn.Parameter) and module.gate_up_proj.dim() == 3:
            handles.append(module.register_forward_pre_hook(routed(name, module.gate_up_proj.shape[0]),
                                                            with_kwargs=True))
    with torch.no_grad():
        for batch in windows.split(2):
            model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return sums


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", sorted(MATRIX))
def test_calibration_sees_every_layer_as_a_plain_forward_does(family: str, dtype: torch.dtype,
                                                               tmp_path: Path) -> None:
    """Layer-by-layer calibration gives the Hessians of one plain forward of the whole model: each layer
    with its own mask and rotary embeddings (layer 0's, replayed everywhere, were 19-72% off on
    Gemma 2/3 and GPT-OSS), each expert with the tokens routed to it, routers included, under the
    checkpoint's names; experts stored 3-D on disk (GPT-OSS) get one Hessian per expert. The layers
    are read from disk one at a time, their bfloat16 matrices widened one product at a time."""
    from skillhub.compress.calibrate import CalibrationSet, capture_statistics, layer_index, load_for_calibration
    from skillhub.compress.roles import role_of
    from skillhub.io.checkpoint import open_checkpoint
    from skillhub.io.layout import CheckpointLayout

    config = AutoConfig.for_model(family, **{**_COMMON, **MATRIX[family]})
    torch.manual_seed(0)
    with quiet_transformers():
        AutoModelForCausalLM.from_config(config).to(dtype).save_pretrained(tmp_path)
    lazy = load_for_calibration(tmp_path, device="cpu")
    windows = torch.randint(3, 64, (4, 24), generator=torch.Generator().manual_seed(1))  # longer than the window
    captured = {}
    for _, statistics in capture_statistics(lazy, CalibrationSet(windows, {}), batch_size=2):
        captured.update(statistics)
    model = plain_model(tmp_path)
    oracle = _plain_forward_statistics(model, windows)

    checkpoint = open_checkpoint(tmp_path)
    routers = [n for n in captured if role_of(n, model_type=family, ndim=2) == "router"]
    saved_as = CheckpointLayout(model).whole
    for key, (total, count) in oracle.items():
        if isinstance(key, tuple):
            # An expert's routed tokens are the input of its gate and up projections, and all tokens
            # are the input of the layer's routers.
            experts, expert = key
            layer = layer_index(experts + ".")
            if expert is None:
                names = [n for n in routers if layer_index(n) == layer]
                assert len(names) == (2 if family in ("qwen2_moe", "qwen3_next") else 1), (key, names)
            elif f"{experts}.gate_up_proj" in captured:  # saved 3-D: a Hessian per expert
                stacked = captured[f"{experts}.gate_up_proj"]
                assert hessians_agree(stacked.hessian[expert], 2.0 / count * total), key
                continue
            else:
                names = [n for n in captured if (m := _EXPERT_INPUT.search(n)) and int(m.group(1)) == expert
                         and layer_index(n) == layer]
                assert len(names) == 2, (key, names)
        elif key in saved_as:
            names = [saved_as[key]]
        else:  # a tied head is the embedding's weight, not a tensor of its own
            assert key == "lm_head.weight" and config.tie_word_embeddings, key
            names = []
        for name in names:
            assert captured[name].samples == count, name
            assert hessians_agree(captured[name].hessian, 2.0 / count * total), name
            # Orientation as saved: GPT-2's Conv1D stores (in, out), nn.Linear (out, in).
            rows, columns = checkpoint.shape(name)
            assert captured[name].hessian.shape[0] == (rows if captured[name].transposed else columns), name
            assert captured[name].transposed == (family == "gpt2" and "wte" not in name), name

    layer_maps = {n for n in checkpoint.names()
                  if role_of(n, model_type=family, ndim=len(checkpoint.shape(n))) in ("attention", "mlp", "router")
                  and len(checkpoint.shape(n)) >= 2}
    assert not layer_maps - set(captured), sorted(layer_maps - set(captured))


def test_a_matrix_without_statistics_is_listed_and_warned_about(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """A layer matrix calibration has no statistics for (here the embedding, made an MLP matrix by a
    role override: a lookup, not a linear map) falls back to round-to-nearest: the manifest lists
    it in quantizer.uncalibrated, its meta says rtn, and create warns once; every other matrix,
    3-D experts included, is quantized by GPTQ."""
    base, tuned = _fine_tune("gpt_oss", MATRIX["gpt_oss"], tmp_path)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{i % 37} {i}" for i in range(2000)))
    recipe = {**PAPER_RECIPE, "name": "embedding-as-mlp",
              "role_overrides": [{"pattern": r"embed_tokens\.weight$", "role": "mlp"}]}
    pack = create_pack(base, tuned, tmp_path / "pack", task="t", recipe=recipe, calib=calib, calib_samples=4,
                       calib_seqlen=32)
    quantizers = _svd_quantizers(pack)
    fallen_back = sorted(n for n, q in quantizers.items() if q == "rtn")
    assert fallen_back == pack.manifest["quantizer"]["uncalibrated"] == ["model.embed_tokens.weight"]
    assert any(n.startswith("model.layers.0.mlp.experts.gate_up_proj#") for n in quantizers)
    warned = [r.getMessage() for r in caplog.records if "had no calibration statistics" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("1 layer matrices")


def test_an_expert_no_calibration_token_reached_is_listed(tmp_path: Path) -> None:
    """Two calibration tokens routed to one expert each reach at most 2 of 8 experts per layer: the
    others have no statistics, fall back to round-to-nearest, and are listed as NAME#EXPERT."""
    base, tuned = _fine_tune("gpt_oss", {**MATRIX["gpt_oss"], "num_local_experts": 8, "num_experts_per_tok": 1},
                             tmp_path)
    calib = tmp_path / "calib.txt"
    calib.write_text("ab ab ab")
    pack = create_pack(base, tuned, tmp_path / "pack", task="t", calib=calib, calib_samples=1, calib_seqlen=2)
    listed = pack.manifest["quantizer"]["uncalibrated"]
    quantizers = _svd_quantizers(pack)
    assert sorted(listed) == sorted(n for n, q in quantizers.items() if q == "rtn")
    assert all("mlp.experts." in name and "#" in name for name in listed)
    assert len(listed) >= 2 * 2 * 6  # 2 layers x (gate_up, down) x at least 6 experts
    assert any(q == "gptq" and "#" in n for n, q in quantizers.items())  # the experts that were reached


@pytest.mark.parametrize("family", [f for f in MOE if f != "gpt_oss"])  # GPT-OSS's original format is fused already
def test_experts_fused_on_disk_are_calibrated(family: str, tmp_path: Path) -> None:
    """A checkpoint saved as transformers 5 holds it (save_original_format=False: one 3-D
    ``experts.gate_up_proj``, not per-expert ``experts.N.gate_proj``): calibration reads that layout
    too, and every expert matrix a token reached is GPTQ-quantized with its own statistics."""
    config = AutoConfig.for_model(family, **{**_COMMON, **MATRIX[family]})
    torch.manual_seed(0)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(tmp_path / "base", save_original_format=False)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1e-3 * torch.randn_like(parameter))
        model.save_pretrained(tmp_path / "tuned", save_original_format=False)
    for folder in ("base", "tuned"):
        build_tokenizer().save_pretrained(tmp_path / folder)
    stored = open_checkpoint(tmp_path / "base").names()
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in stored), "not saved fused: nothing to test"
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{i % 37} {i}" for i in range(2000)))
    pack = create_pack(tmp_path / "base", tmp_path / "tuned", tmp_path / "pack", task="t", calib=calib,
                       calib_samples=4, calib_seqlen=32)
    quantizers = _svd_quantizers(pack)
    experts = {n: q for n, q in quantizers.items() if ".experts.gate_up_proj#" in n or ".experts.down_proj#" in n}
    assert experts and set(experts.values()) == {"gptq"}, sorted(n for n, q in experts.items() if q != "gptq")


# Families whose matrices carry the names --dry-run knows: q, k and v read one input, gate and up
# another, every other matrix its own. Its count of the Hessians calibration holds is exact for them
# and an over-count for the rest: GPT-2's Conv1D stores the input axis first, multi-head latent and
# linear attention share an input under other names, Cohere's attention and MLP read one normed
# input side by side, and an expert no token reaches has none.
_NAMED_INPUTS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt_neox")


@pytest.mark.parametrize("family", sorted(MATRIX))
def test_dry_run_counts_the_hessians_calibration_holds(family: str, tmp_path: Path) -> None:
    """--dry-run's memory for a calibrated layer counts its Hessians from names and shapes alone:
    as many bytes as calibration holds for each layer, and the same matrices sharing one (GPTQ
    factors a copy of a shared Hessian). It once counted o_proj as sharing q/k/v's (one input width)."""
    from collections import Counter

    from skillhub.compress.calibrate import CalibrationSet, capture_statistics, load_for_calibration
    from skillhub.compress.estimate import _hessian_key, _hessians_of_layers
    from skillhub.compress.pipeline import plan_every_parameter
    from skillhub.compress.recipe import Recipe

    config = AutoConfig.for_model(family, **{**_COMMON, **MATRIX[family]})
    torch.manual_seed(0)
    with quiet_transformers():
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    checkpoint = open_checkpoint(tmp_path)
    predicted = _hessians_of_layers(checkpoint, plan_every_parameter(Recipe("paper"), checkpoint))
    windows = torch.randint(3, 64, (4, 24), generator=torch.Generator().manual_seed(1))
    layers = 0
    for index, statistics in capture_statistics(load_for_calibration(tmp_path, device="cpu"),
                                                CalibrationSet(windows, {})):
        if index is None:
            continue
        layers += 1
        storages = {name: stats.hessian.untyped_storage() for name, stats in statistics.items()}
        held = {storage.data_ptr(): storage.nbytes() for storage in storages.values()}
        counted = sum(hessian.bytes for hessian in predicted[index].values())
        if family not in _NAMED_INPUTS:
            assert counted >= sum(held.values()), (index, counted, sum(held.values()))
            continue
        assert counted == sum(held.values()), (index, counted, sum(held.values()))
        readers = Counter(storage.data_ptr() for storage in storages.values())
        assert ({name for name in statistics if predicted[index][_hessian_key(name)].readers > 1}
                == {name for name, storage in storages.items() if readers[storage.data_ptr()] > 1})
    assert layers == config.num_hidden_layers
