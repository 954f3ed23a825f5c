"""Tensors compressed as the matrices they are made of: experts saved as one 3-D tensor, and fused
projections (Phi-3's qkv_proj and gate_up_proj, GPT-2's c_attn) cut by the config's sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from skillhub import apply_packs, create_pack, load_pack
from skillhub.compress.recipe import PAPER_RECIPE
from skillhub.compress.splits import split_for
from skillhub.errors import PackError
from skillhub.operators import Split
from skillhub.operators.builtin.svd import resolve_rank_groups

from conftest import copy_tree
from test_families import MATRIX, _fine_tune, _logits


@pytest.mark.parametrize("split", [Split.experts(3), Split(axis=0, sizes=(4, 2, 2)), Split(axis=1, sizes=(3, 3, 2))])
def test_pieces_join_back_exactly(split: Split) -> None:
    tensor = torch.randn((3, 8, 8) if split.squeeze else (8, 8))
    pieces = split.pieces(tensor)
    assert [tuple(p.shape) for p in pieces] == split.part_shapes(tuple(tensor.shape))
    assert torch.equal(split.join(pieces), tensor)
    assert Split.from_json(json.loads(json.dumps(split.as_json()))) == split


def test_what_is_cut_and_where() -> None:
    phi3 = {"model_type": "phi3", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 96}
    assert split_for("model.layers.0.self_attn.qkv_proj.weight", role="attention", shape=(128, 64), config=phi3,
                     fused=True) == Split(axis=0, sizes=(64, 32, 32))
    assert split_for("model.layers.0.mlp.gate_up_proj.weight", role="mlp", shape=(192, 64), config=phi3,
                     fused=True) == Split(axis=0, sizes=(96, 96))
    assert split_for("model.layers.0.self_attn.qkv_proj.weight", role="attention", shape=(128, 64), config=phi3,
                     fused=False) is None  # only when the recipe asks
    gpt2 = {"model_type": "gpt2", "n_embd": 32}
    assert split_for("transformer.h.0.attn.c_attn.weight", role="attention", shape=(32, 96), config=gpt2,
                     fused=True) == Split(axis=1, sizes=(32, 32, 32))
    # Experts saved 3-D are always cut; a config whose sizes do not add up keeps the tensor whole.
    assert split_for("model.layers.0.mlp.experts.down_proj", role="mlp", shape=(4, 64, 32), config={},
                     fused=False) == Split.experts(4)
    assert split_for("model.layers.0.self_attn.qkv_proj.weight", role="attention", shape=(120, 64), config=phi3,
                     fused=True) is None
    assert split_for("model.layers.0.mlp.experts.gate_up_proj_bias", role="bias", shape=(4, 64), config={},
                     fused=True) is None


def test_fused_projections_get_a_matrix_rank_each(tmp_path: Path) -> None:
    """Phi-3's q, k and v are compressed as three matrices, each with the rank the paper recipe gives
    a matrix of its size (whole, they shared one matrix's rank), and the error drops."""
    base, tuned = _fine_tune("phi3", MATRIX["phi3"], tmp_path)
    split = create_pack(base, tuned, tmp_path / "split", task="t")
    whole = create_pack(base, tuned, tmp_path / "whole", task="t", recipe={**PAPER_RECIPE, "split_fused": False})
    name = "model.layers.0.self_attn.qkv_proj.weight"
    entry = split.manifest["modules"][name]
    assert entry["split"] == {"axis": 0, "sizes": [64, 32, 32]}
    groups = next(r for r in PAPER_RECIPE["rules"] if r["match"]["role"] == "attention")["params"]["groups"]
    assert [part["rank"] for part in entry["meta"]["parts"]] == [
        sum(r for r, _ in resolve_rank_groups(groups, rows, 4096)) for rows in (64, 32, 32)]
    assert whole.manifest["modules"][name]["meta"]["rank"] == entry["meta"]["parts"][0]["rank"]  # one for three
    for module in (name, "model.layers.1.mlp.gate_up_proj.weight"):
        assert split.manifest["modules"][module]["error"] < whole.manifest["modules"][module]["error"], module
    ids = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    before, after = _logits(base, ids), _logits(tuned, ids)
    got = _logits(apply_packs(base, [split], tmp_path / "applied"), ids)
    assert ((got - after).norm() / (after - before).norm()).item() < 0.6


def test_gpt2_c_attn_parts_are_calibrated_as_stored(tmp_path: Path) -> None:
    """GPT-2's c_attn is (in, out): cut into column blocks, each part quantized by GPTQ against the
    shared input, in its stored orientation."""
    base, tuned = _fine_tune("gpt2", MATRIX["gpt2"], tmp_path)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{i % 37} {i}" for i in range(2000)))
    pack = create_pack(base, tuned, tmp_path / "pack", task="t", calib=calib, calib_samples=4, calib_seqlen=32)
    entry = pack.manifest["modules"]["transformer.h.0.attn.c_attn.weight"]
    assert entry["split"] == {"axis": 1, "sizes": [64, 64, 64]}
    assert [(p["quantizer"], p.get("transposed")) for p in entry["meta"]["parts"]] == [("gptq", True)] * 3
    assert "uncalibrated" not in pack.manifest["quantizer"]
    decoded = pack.decode("transformer.h.0.attn.c_attn.weight")
    assert decoded.shape == (64, 192) and torch.isfinite(decoded).all()


def test_pieces_of_a_fused_projection_never_overwrite_their_shared_hessian() -> None:
    """q, k and v of a fused qkv_proj read one input: an exclusive Hessian is exclusive to the
    tensor, not to any one piece, so each piece is quantized against the Hessian itself."""
    from skillhub.operators import EncodeContext, LayerStatistics, get_operator, resolve_params
    from skillhub.operators.parts import encode_split

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 512, generator=generator) * torch.logspace(0, -1, 64)[:, None]
    hessian = 2 * inputs @ inputs.T / 512
    delta = torch.randn(96, 64, generator=generator) * 0.01
    operator = get_operator("svd-mixed")
    params = resolve_params(operator, {"groups": [[4, 8], [12, 3]], "group_size": 32}, where="test")
    split = Split(axis=0, sizes=(32, 32, 32))
    packed = []
    for exclusive in (False, True):
        statistics = LayerStatistics(hessian=hessian.clone(), samples=512, exclusive=exclusive)
        ctx = EncodeContext(name="qkv_proj.weight", role="attention", calibration=statistics)
        packed.append(encode_split(operator, delta, params, ctx, split).tensors)
        assert torch.equal(statistics.hessian, hessian)
    assert packed[0].keys() == packed[1].keys()
    assert all(torch.equal(packed[0][key], packed[1][key]) for key in packed[0])


def test_budget_mode_fits_with_split_modules(tmp_path: Path) -> None:
    base, tuned = _fine_tune("gpt_oss", MATRIX["gpt_oss"], tmp_path)
    pack = create_pack(base, tuned, tmp_path / "pack", task="t", ratio=0.2)
    totals = pack.manifest["totals"]
    assert totals["stored_bytes"] <= 0.2 * totals["delta_fp16_bytes"]
    experts = pack.manifest["modules"]["model.layers.0.mlp.experts.gate_up_proj"]
    assert experts["split"]["squeeze"] and len(experts["meta"]["parts"]) == 4
    assert experts["error"] < 1.0


def test_inspect_shows_the_parts(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from skillhub.cli import main

    base, tuned = _fine_tune("gpt_oss", MATRIX["gpt_oss"], tmp_path)
    pack = create_pack(base, tuned, tmp_path / "pack", task="t")
    shown = CliRunner().invoke(main, ["inspect", str(pack.path)], catch_exceptions=False)
    line = next(row for row in shown.output.splitlines() if "layers.0.mlp.experts.gate_up_proj " in row)
    assert "parts=4" in line
    as_json = json.loads(CliRunner().invoke(main, ["inspect", str(pack.path), "--json"]).output)
    entry = next(m for m in as_json["modules"] if m["name"] == "model.layers.0.mlp.experts.gate_up_proj")
    assert entry["split"] == {"axis": 0, "sizes": [1, 1, 1, 1], "squeeze": True}


def test_a_split_that_does_not_tile_the_tensor_is_refused(tmp_path: Path) -> None:
    base, tuned = _fine_tune("gpt_oss", MATRIX["gpt_oss"], tmp_path)
    pack = create_pack(base, tuned, tmp_path / "pack", task="t")
    name = "model.layers.0.mlp.experts.down_proj"
    assert torch.allclose(load_pack(pack.path).decode(name), pack.decode(name))
    broken = copy_tree(pack.path, tmp_path / "broken")
    manifest = json.loads((broken / "skillpack.json").read_text())
    manifest["modules"][name]["split"]["sizes"] = [1, 1, 1, 1, 1]
    (broken / "skillpack.json").write_text(json.dumps(manifest))
    with pytest.raises(PackError):
        load_pack(broken).check_decodable()


@pytest.mark.parametrize(("family", "extra"), [("llama", {"tie_word_embeddings": True}), ("gpt2", {}), ("gemma", {})])
def test_a_tied_embedding_is_compressed_like_a_matrix(family: str, extra: dict, tmp_path: Path) -> None:
    """The word embedding a tied model shares with its head has a dense delta: the paper recipe and
    budget mode compress it like an MLP matrix, not by pruning (bench_families: 10-17x less logit
    error at a quarter of the bytes). Position embeddings keep the pruning, and so do untied models
    (the golden paper pack)."""
    base, tuned = _fine_tune(family, {**MATRIX.get(family, {}), **extra}, tmp_path)
    word = {"gpt2": "transformer.wte.weight"}.get(family, "model.embed_tokens.weight")
    for pack in (create_pack(base, tuned, tmp_path / "paper", task="t"),
                 create_pack(base, tuned, tmp_path / "budget", task="t", ratio=0.1)):
        modules = pack.manifest["modules"]
        assert (modules[word]["role"], modules[word]["operator"]) == ("embedding", "svd-mixed")
        if family == "gpt2":
            assert modules["transformer.wpe.weight"]["operator"] == "magnitude-prune"
