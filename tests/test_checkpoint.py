"""Reading checkpoints and taking deltas: sharding, refusal of pickles, mismatches, NaN."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from skillhub.compress.delta import check_compatible, iter_deltas
from skillhub.errors import CheckpointError, DeltaError, MismatchError
from skillhub.io.checkpoint import Checkpoint, fingerprint, open_checkpoint
from skillhub.demo.synthetic import build_tiny_model
from skillhub.io.tensorfile import TensorFile

from conftest import FineTune, copy_tree, edit_config, edit_tensors


def poison_one_value(tensors: dict[str, torch.Tensor]) -> None:
    tensors["model.layers.2.self_attn.v_proj.weight"][3, 5] = float("nan")


def _shard(source: Path, destination: Path, shards: int) -> Path:
    """Re-save a single-file checkpoint as `shards` safetensors files with an index."""
    copy_tree(source, destination)
    whole = TensorFile(destination / "model.safetensors")
    names = whole.keys()
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file_name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: whole.read(n) for n in part}, destination / file_name, metadata={"format": "pt"})
        weight_map.update({n: file_name for n in part})
    (destination / "model.safetensors").unlink()
    (destination / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return destination


def test_sharded_checkpoint_reads_the_same_tensors_and_fingerprint(finetuned: FineTune, tmp_path: Path) -> None:
    single = Checkpoint(finetuned.base)
    sharded = Checkpoint(_shard(finetuned.base, tmp_path / "sharded", 3))
    assert sharded.names() == single.names()
    for name in single.names():
        assert torch.equal(sharded.read(name), single.read(name))
    assert fingerprint(sharded) == fingerprint(single)


def test_fingerprint_changes_when_one_value_changes(finetuned: FineTune, tmp_path: Path) -> None:
    def nudge(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.norm.weight"][0] += 1e-3

    changed = edit_tensors(copy_tree(finetuned.base, tmp_path / "changed"), nudge)
    assert fingerprint(Checkpoint(changed)) != fingerprint(Checkpoint(finetuned.base))


def test_missing_shard_named_in_index_is_an_error(finetuned: FineTune, tmp_path: Path) -> None:
    sharded = _shard(finetuned.base, tmp_path / "sharded", 2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing shard.*model-00002-of-00002"):
        Checkpoint(sharded)


def test_pickle_only_checkpoint_is_refused_without_unpickling(tmp_path: Path) -> None:
    model = tmp_path / "pickled"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    # Not a valid pickle at all: if anything tried to unpickle it, it would fail differently.
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model\.bin\).*never unpickles"):
        Checkpoint(model)


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint(tmp_path)


def test_reference_that_is_neither_directory_nor_hub_id(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="neither a model directory nor a Hub id"):
        open_checkpoint(tmp_path / "does-not-exist")


def test_truncated_safetensors_is_refused(finetuned: FineTune, tmp_path: Path) -> None:
    broken = copy_tree(finetuned.base, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(broken)


def test_delta_is_tuned_minus_base_in_float32(finetuned: FineTune) -> None:
    base, tuned = Checkpoint(finetuned.base), Checkpoint(finetuned.tuned)
    check_compatible(base, tuned)
    seen = 0
    for item in iter_deltas(base, tuned):
        assert item.delta.dtype == torch.float32
        assert torch.equal(item.delta, tuned.read(item.name).float() - base.read(item.name).float())
        seen += 1
    assert seen == len(base.names())


def test_different_architecture_is_refused(finetuned: FineTune, tmp_path: Path) -> None:
    other = edit_config(copy_tree(finetuned.tuned, tmp_path / "other"),
                        model_type="mistral", architectures=["MistralForCausalLM"])
    with pytest.raises(MismatchError, match="architectures differ: base is LlamaForCausalLM.*tuned is MistralForCausalLM"):
        check_compatible(Checkpoint(finetuned.base), Checkpoint(other))


def test_different_shapes_are_named(finetuned: FineTune, tmp_path: Path) -> None:
    wider = build_tiny_model(tmp_path / "wider", seed=0, intermediate=256)
    with pytest.raises(MismatchError, match=r"differ in shape.*mlp\.down_proj\.weight \[128, 384\] vs \[128, 256\]"):
        check_compatible(Checkpoint(finetuned.base), Checkpoint(wider))


def test_missing_tensor_is_named(finetuned: FineTune, tmp_path: Path) -> None:
    partial = edit_tensors(copy_tree(finetuned.tuned, tmp_path / "partial"),
                           lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(MismatchError, match=r"lacks 1 tensor\(s\) of the base: model\.layers\.1\.mlp\.up_proj\.weight"):
        check_compatible(Checkpoint(finetuned.base), Checkpoint(partial))


def test_tied_versus_untied_head_is_explained(finetuned: FineTune, tmp_path: Path) -> None:
    tied = edit_tensors(copy_tree(finetuned.tuned, tmp_path / "tied"), lambda t: t.pop("lm_head.weight"))
    edit_config(tied, tie_word_embeddings=True)
    with pytest.raises(MismatchError, match=r"tuned model ties its output head.*base model does not.*lm_head\.weight"):
        check_compatible(Checkpoint(finetuned.base), Checkpoint(tied))


def test_nan_in_tuned_weights_names_the_tensor(finetuned: FineTune, tmp_path: Path) -> None:
    poisoned = edit_tensors(copy_tree(finetuned.tuned, tmp_path / "poisoned"), poison_one_value)
    base, tuned = Checkpoint(finetuned.base), Checkpoint(poisoned)
    with pytest.raises(DeltaError, match=r"model\.layers\.2\.self_attn\.v_proj\.weight has 1 NaN/Inf"):
        for _ in iter_deltas(base, tuned):
            pass
