"""PEFT LoRA in and out, with the real ``peft`` library: `export --format peft [--for vllm]`,
`create/add --from-peft`, round trips against PEFT's own loading and merging, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from skillhub.activation import apply_packs
from skillhub.cli import main
from skillhub.demo.synthetic import build_tiny_model
from skillhub.pack.format import load_pack

from conftest import FineTune

IDS = torch.randint(0, 64, (3, 24), generator=torch.Generator().manual_seed(1))


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits.float()


def load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def peft_logits(base: Path, adapter: Path, *, merge: bool) -> torch.Tensor:
    model = PeftModel.from_pretrained(load(base), str(adapter))
    return logits(model.merge_and_unload() if merge else model)


def make_adapter(base: Path, output: Path, **overrides) -> Path:
    """A trained-looking LoRA adapter (random B, not zero) with every feature skillhub maps:
    rank/alpha patterns, rsLoRA, an embedding LoRA and a module to save."""
    torch.manual_seed(3)
    settings = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                    modules_to_save=["model.norm"], rank_pattern={"down_proj": 4}, alpha_pattern={"down_proj": 3},
                    use_rslora=True, init_lora_weights=False)
    settings.update(overrides)
    model = get_peft_model(load(base), LoraConfig(**settings))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.mul_(0.3)  # a delta of a fine-tune's size, not of the random init's
        if settings["modules_to_save"]:
            model.base_model.model.model.norm.modules_to_save["default"].weight.add_(0.05)
    model.save_pretrained(output)
    return output


def test_uncapped_export_loads_in_peft_and_gives_the_packs_logits(paper_pack, finetuned: FineTune,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    result = cli("export", str(paper_pack.path), "-o", str(out), "--format", "peft", "--base", str(finetuned.base),
                 "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    activated = apply_packs(finetuned.base, [paper_pack], tmp_path / "activated")
    expected, plain = logits(load(activated)), logits(load(finetuned.base))
    effect = float((expected - plain).norm())
    for merge in (False, True):  # PEFT's forward with the adapter, and its merged model
        error = float((peft_logits(finetuned.base, out, merge=merge) - expected).norm())
        assert error <= 1e-4 * effect, (merge, error, effect)
    assert report["check"]["relative_error"] <= 1e-4  # the export's own measurement agrees
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"]
    assert config["alpha_pattern"] == config["rank_pattern"]  # alpha = r everywhere: scaling 1
    assert set(config["modules_to_save"]) >= {"lm_head", "model.embed_tokens", "model.norm"}
    assert all(name.endswith(("_proj",)) for name in config["target_modules"])
    card = (out / "README.md").read_text()
    assert "base_model_relation: adapter" in card and "library_name: peft" in card and "base_model:" in card
    actions = {m["action"] for m in report["modules"]}
    assert actions == {"lora", "modules_to_save"} and all(m["energy_lost"] < 1e-9 for m in report["modules"])


def test_float16_export_is_within_float16_tolerance(paper_pack, finetuned: FineTune, tmp_path: Path) -> None:
    from skillhub.sharing.peft_export import export_peft

    result = export_peft(paper_pack, tmp_path / "adapter", base=finetuned.base, dtype="float16")
    factors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for k, t in factors.items() if "lora_" in k} == {torch.float16}
    # float16 factors: relative rounding 2^-11 per factor, so the product is within ~1e-3 of the pack's.
    assert 0 < result.check.relative_error <= 5e-3


def test_vllm_export_keeps_to_what_vllm_loads_and_reports_the_rest(paper_pack, finetuned: FineTune,
                                                                   tmp_path: Path) -> None:
    from skillhub.sharing.peft_export import export_peft

    capped = export_peft(paper_pack, tmp_path / "vllm", base=finetuned.base, for_vllm=True, max_rank=4)
    config = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and config["lora_bias"] is False
    assert all(name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
               for name in config["target_modules"])
    tensors = load_file(str(tmp_path / "vllm" / "adapter_model.safetensors"))
    assert all("lora_" in key for key in tensors) and max(t.shape[0] for k, t in tensors.items() if "lora_A" in k) <= 4
    by_name = {m.parameter: m for m in capped.modules}
    dropped = {m.parameter for m in capped.modules if m.action == "dropped"}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= dropped
    assert all(by_name[name].energy_lost == 1.0 for name in dropped)
    # The reported energy lost by truncation is the true share of each delta's squared norm left out.
    pack = load_pack(paper_pack.path)
    for name, module in by_name.items():
        if module.action != "lora":
            continue
        prefix = "base_model.model." + name.removesuffix(".weight")
        exported = tensors[prefix + ".lora_B.weight"].double() @ tensors[prefix + ".lora_A.weight"].double()
        delta = pack.decode(name).double()
        true_lost = float((delta - exported).pow(2).sum() / delta.pow(2).sum())
        assert module.energy_lost == pytest.approx(true_lost, abs=1e-5), name
    assert any(m.energy_lost > 0.01 for m in capped.modules if m.action == "lora")  # rank 4 truncates
    # Dropping the embedding and head deltas costs logit accuracy, and the check measures it.
    assert capped.check.relative_error > 0.01
    uncapped = export_peft(paper_pack, tmp_path / "vllm-512", base=finetuned.base, for_vllm=True)
    assert all(m.energy_lost == 0.0 for m in uncapped.modules if m.action == "lora")
    # What rank 4 costs, measured without the dropped embedding and head (whose loss, 0.79 of the
    # pack's effect here, dominates both vLLM exports and decides their order by a hair).
    exact = export_peft(paper_pack, tmp_path / "exact", base=finetuned.base)
    truncated = export_peft(paper_pack, tmp_path / "rank-4", base=finetuned.base, max_rank=4)
    assert exact.check.relative_error <= 5e-3 < truncated.check.relative_error


def test_from_peft_is_exact_and_round_trips(finetuned: FineTune, tmp_path: Path) -> None:
    adapter = make_adapter(finetuned.base, tmp_path / "adapter")
    result = cli("create", str(finetuned.base), "--from-peft", str(adapter), "-o", str(tmp_path / "pack"),
                 "--task", "lora", "--json")
    assert result.exit_code == 0, result.output
    pack = load_pack(tmp_path / "pack")
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    q = "model.layers.0.self_attn.q_proj"
    assert torch.equal(pack.fields(f"{q}.weight")["A"], saved[f"base_model.model.{q}.lora_A.weight"])  # bit for bit
    assert pack.modules[f"{q}.weight"].meta["scaling"] == pytest.approx(16 / 8 ** 0.5)  # rsLoRA
    assert pack.modules["model.layers.0.mlp.down_proj.weight"].meta["scaling"] == pytest.approx(3 / 4 ** 0.5)
    merged = peft_logits(finetuned.base, adapter, merge=True)
    plain = logits(load(finetuned.base))
    ours = logits(load(apply_packs(finetuned.base, [pack], tmp_path / "activated")))
    assert float((ours - merged).norm()) <= 1e-5 * float((merged - plain).norm())

    # Into a registry and back out through PEFT.
    registry = tmp_path / "registry"
    assert cli("--registry", str(registry), "init", "--base", str(finetuned.base)).exit_code == 0
    added = cli("--registry", str(registry), "add", "--from-peft", str(adapter), "--task", "lora", "--json")
    assert added.exit_code == 0, added.output
    pack_id = json.loads(added.stdout)["id"]
    activated = cli("--registry", str(registry), "activate", "--task", "lora", "-o", str(tmp_path / "from-registry"))
    assert activated.exit_code == 0, activated.output
    assert torch.equal(logits(load(tmp_path / "from-registry")), ours)
    exported = cli("--registry", str(registry), "export", pack_id, "-o", str(tmp_path / "again"), "--format", "peft",
                   "--json")
    assert exported.exit_code == 0, exported.output
    again = peft_logits(finetuned.base, tmp_path / "again", merge=False)
    assert float((again - merged).norm()) <= 1e-4 * float((merged - plain).norm())
    assert json.loads(exported.stdout)["rank"] == 8  # the adapter's own rank survives the round trip


def test_from_peft_compressed_uses_the_recipe(finetuned: FineTune, tmp_path: Path) -> None:
    adapter = make_adapter(finetuned.base, tmp_path / "adapter", modules_to_save=None)
    refused = cli("create", str(finetuned.base), "--from-peft", str(adapter), "-o", str(tmp_path / "x"), "--ratio", "0.1")
    assert refused.exit_code == 2 and "add --compress" in refused.output
    result = cli("create", str(finetuned.base), "--from-peft", str(adapter), "-o", str(tmp_path / "pack"),
                 "--compress", "--json")
    assert result.exit_code == 0, result.output
    pack = load_pack(tmp_path / "pack")
    assert {m.operator for m in pack.modules.values()} >= {"svd-mixed"}  # the paper recipe, not stored factors
    assert pack.manifest["tuned"]["id"] == str(adapter.resolve())
    merged, plain = peft_logits(finetuned.base, adapter, merge=True), logits(load(finetuned.base))
    ours = logits(load(apply_packs(finetuned.base, [pack], tmp_path / "activated")))
    assert float((ours - merged).norm()) < 0.5 * float((merged - plain).norm())  # compressed, still the adapter


@pytest.mark.parametrize("case", ["other-base-shapes", "other-base-name", "other-base-weights", "dora", "loha",
                                  "pickle-only",
                                  "max-rank-0", "embedding-rank-0", "not-an-adapter"])
def test_bad_input_is_one_line_exit_1_nothing_written(case: str, finetuned: FineTune, paper_pack,
                                                      tmp_path: Path) -> None:
    base = str(finetuned.base)
    out = tmp_path / "out"
    if case == "other-base-shapes":
        other = build_tiny_model(tmp_path / "wide", seed=1, hidden=96)
        args, message = ["create", base, "--from-peft", str(make_adapter(other, tmp_path / "a")), "-o", str(out),
                         "--ignore-base-name"], "made for another model"
    elif case == "other-base-name":
        other = build_tiny_model(tmp_path / "other-model", seed=1)
        args, message = ["create", base, "--from-peft", str(make_adapter(other, tmp_path / "a")), "-o", str(out)], \
            "the adapter was trained on"
    elif case == "other-base-weights":  # same shapes, name waved through: PEFT's saved embedding tells
        args, message = ["create", base, "--from-peft", str(make_adapter(finetuned.tuned, tmp_path / "a")), "-o",
                         str(out), "--ignore-base-name"], "trained on other weights"
    elif case == "dora":
        args, message = ["create", base, "--from-peft", str(make_adapter(finetuned.base, tmp_path / "a", use_dora=True,
                                                                          target_modules=["q_proj"],
                                                                          modules_to_save=None, rank_pattern={},
                                                                          alpha_pattern={})), "-o", str(out)], "DoRA"
    elif case == "loha":
        from peft import LoHaConfig

        model = get_peft_model(load(finetuned.base), LoHaConfig(r=4, target_modules=["q_proj"]))
        model.save_pretrained(tmp_path / "a")
        args, message = ["create", base, "--from-peft", str(tmp_path / "a"), "-o", str(out)], "PEFT LOHA adapter"
    elif case == "pickle-only":
        adapter = make_adapter(finetuned.base, tmp_path / "a")
        (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
        args, message = ["create", base, "--from-peft", str(adapter), "-o", str(out)], "a pickle skillhub never loads"
    elif case == "max-rank-0":
        args, message = ["export", str(paper_pack.path), "-o", str(out), "--format", "peft", "--base", base,
                         "--max-rank", "0"], "--max-rank must be at least 1"
    elif case == "embedding-rank-0":
        args, message = ["export", str(paper_pack.path), "-o", str(out), "--format", "peft", "--base", base,
                         "--embedding-rank", "0"], "--embedding-rank must be at least 1"
    else:
        args, message = ["create", base, "--from-peft", str(finetuned.tuned), "-o", str(out)], "is not a PEFT adapter"
    result = cli(*args)
    assert result.exit_code == 1, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()


def test_export_without_a_base_says_what_it_needs(paper_pack, finetuned: FineTune, tmp_path: Path) -> None:
    result = cli("export", str(paper_pack.path), "-o", str(tmp_path / "out"), "--format", "peft")
    assert result.exit_code == 1 and "pass --base BASE" in result.output
    wrong = cli("export", str(paper_pack.path), "-o", str(tmp_path / "out"), "--format", "peft",
                "--base", str(finetuned.tuned))
    assert wrong.exit_code == 1 and "is not the base of pack" in wrong.output
    # A vLLM export without a check needs no base at all: its LoRA factors come from the pack alone.
    alone = cli("export", str(paper_pack.path), "-o", str(tmp_path / "out"), "--format", "peft", "--for", "vllm",
                "--no-check", "--json")
    assert alone.exit_code == 0, alone.output
    assert json.loads(alone.stdout)["check"] is None


def test_a_tied_head_follows_the_exported_embedding(tmp_path: Path) -> None:
    """With tie_word_embeddings the pack's embedding delta also moves the head; PEFT must tie its
    copy of the head to the exported embedding (ensure_weight_tying) for the logits to agree."""
    from skillhub import create_pack
    from skillhub.demo.synthetic import build_tokenizer, tiny_llama_config
    from skillhub.sharing.peft_export import export_peft

    config = tiny_llama_config(layers=2)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    for name, perturbed in (("base", False), ("tuned", True)):
        if perturbed:
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(torch.randn_like(parameter) * 0.01)
        model.save_pretrained(tmp_path / name)
        build_tokenizer().save_pretrained(tmp_path / name)
    pack = create_pack(tmp_path / "base", tmp_path / "tuned", tmp_path / "pack")
    assert "lm_head.weight" not in pack.modules and "model.embed_tokens.weight" in pack.modules
    for options in ({}, {"embedding_rank": 64}):  # modules_to_save, and a full-rank embedding LoRA
        result = export_peft(pack, tmp_path / "adapter", base=tmp_path / "base", force=True, **options)
        assert result.check.relative_error < 1e-4, options


def test_a_densely_stored_matrix_is_exported_exactly_and_said_to_be_larger(finetuned: FineTune, tmp_path: Path) -> None:
    """rtn stores attention and MLP deltas densely: the exact LoRA has rank min(m, n), more bytes
    than the dense delta, and the export says so; --max-rank truncates it by SVD instead."""
    from skillhub import create_pack
    from skillhub.sharing.peft_export import export_peft

    recipe = {"name": "dense", "rules": [
        {"match": {"role": ["attention", "mlp"]}, "operator": "rtn", "params": {"bits": 8, "group_size": 64}},
        {"match": {"pattern": "."}, "operator": "raw"}]}
    pack = create_pack(finetuned.base, finetuned.tuned, tmp_path / "pack", recipe=recipe)
    exact = export_peft(pack, tmp_path / "exact", base=finetuned.base)
    assert exact.check.relative_error < 1e-4
    assert any("larger than the dense delta" in w for w in exact.warnings)
    assert all(m.rank == min(pack.modules[m.parameter].shape) for m in exact.modules if m.action == "lora")
    capped = export_peft(pack, tmp_path / "capped", base=finetuned.base, max_rank=16)
    assert not capped.warnings and all(0 < m.energy_lost < 1 for m in capped.modules if m.action == "lora")


def test_an_adapter_is_imported_from_the_hub_by_id(hub, finetuned: FineTune, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`--from-peft OWNER/NAME` downloads only the adapter's config and safetensors (the real
    huggingface_hub client against the suite's Hub server) and records the commit it read."""
    from huggingface_hub import HfApi, constants

    from conftest import HUB_TOKENS

    token = next(t for t, user in HUB_TOKENS.items() if user == "alice")
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    adapter = make_adapter(finetuned.base, tmp_path / "adapter")
    (adapter / "adapter_model.bin").write_bytes(b"not to be downloaded")
    api = HfApi(token=token)
    api.create_repo("alice/shift-lora", exist_ok=True)
    commit = api.upload_folder(repo_id="alice/shift-lora", folder_path=str(adapter)).oid
    result = cli("create", str(finetuned.base), "--from-peft", "alice/shift-lora", "-o", str(tmp_path / "pack"),
                 "--ignore-base-name", "--json")
    assert result.exit_code == 0, result.output
    pack = load_pack(tmp_path / "pack")
    assert pack.manifest["tuned"]["id"] == f"alice/shift-lora@{commit}"
    downloaded = {p.name for p in (tmp_path / "hf-cache").rglob("*") if p.is_file() and "snapshots" in p.parts}
    assert downloaded == {"adapter_config.json", "adapter_model.safetensors"}
    assert hub.errors == []


def test_existing_outputs_are_refused_before_any_work(paper_pack, finetuned: FineTune, tmp_path: Path) -> None:
    """A user's directory at -o is never touched, and is named before the base is read in full."""
    taken = tmp_path / "mine"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    adapter = make_adapter(finetuned.base, tmp_path / "adapter")
    for args in (["export", str(paper_pack.path), "--format", "peft", "--base", str(finetuned.base)],
                 ["create", str(finetuned.base), "--from-peft", str(adapter)]):
        result = cli(*args, "-o", str(taken))
        assert result.exit_code == 1 and "already exists" in result.output, result.output
        forced = cli(*args, "-o", str(taken), "--force")
        assert forced.exit_code == 1 and "was not written by skillhub" in forced.output, forced.output
        assert [p.name for p in taken.iterdir()] == ["notes.txt"]
