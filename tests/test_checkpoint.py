"""Reading checkpoints and taking deltas: sharding, refusal of pickles, mismatches, NaN."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from skillhub.delta import check_compatible, iter_deltas
from skillhub.errors import CheckpointError, DeltaError, MismatchError
from skillhub.models import Checkpoint, fingerprint, open_checkpoint
from skillhub.synthetic import build_tiny_model
from skillhub.tensorfile import TensorFile

from conftest import FineTune, copy_tree


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
    changed = copy_tree(finetuned.base, tmp_path / "changed")
    whole = TensorFile(changed / "model.safetensors")
    tensors = {n: whole.read(n).clone() for n in whole.keys()}
    tensors["model.norm.weight"][0] += 1e-3
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
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
    other = copy_tree(finetuned.tuned, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config["model_type"], config["architectures"] = "mistral", ["MistralForCausalLM"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(MismatchError, match="architectures differ: base is LlamaForCausalLM.*tuned is MistralForCausalLM"):
        check_compatible(Checkpoint(finetuned.base), Checkpoint(other))


def test_different_shapes_are_named(finetuned: FineTune, tmp_path: Path) -> None:
    wider = build_tiny_model(tmp_path / "wider", seed=0, intermediate=256)
    with pytest.raises(MismatchError, match=r"differ in shape.*mlp\.down_proj\.weight \[128, 384\] vs \[128, 256\]"):
        check_compatible(Checkpoint(finetuned.base), Checkpoint(wider))


def test_missing_tensor_is_named(finetuned: FineTune, tmp_path: Path) -> None:
    partial = copy_tree(finetuned.tuned, tmp_path / "partial")
    whole = TensorFile(partial / "model.safetensors")
    kept = {n: whole.read(n) for n in whole.keys() if n != "model.layers.1.mlp.up_proj.weight"}
    save_file(kept, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MismatchError, match=r"lacks 1 tensor\(s\) of the base: model\.layers\.1\.mlp\.up_proj\.weight"):
        check_compatible(Checkpoint(finetuned.base), Checkpoint(partial))


def test_tied_versus_untied_head_is_explained(finetuned: FineTune, tmp_path: Path) -> None:
    tied = copy_tree(finetuned.tuned, tmp_path / "tied")
    whole = TensorFile(tied / "model.safetensors")
    save_file({n: whole.read(n) for n in whole.keys() if n != "lm_head.weight"}, tied / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((tied / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(config))
    with pytest.raises(MismatchError, match=r"tuned model ties its output head.*base model does not.*lm_head\.weight"):
        check_compatible(Checkpoint(finetuned.base), Checkpoint(tied))


def test_nan_in_tuned_weights_names_the_tensor(finetuned: FineTune, tmp_path: Path) -> None:
    poisoned = copy_tree(finetuned.tuned, tmp_path / "poisoned")
    whole = TensorFile(poisoned / "model.safetensors")
    tensors = {n: whole.read(n).clone() for n in whole.keys()}
    tensors["model.layers.2.self_attn.v_proj.weight"][3, 5] = float("nan")
    save_file(tensors, poisoned / "model.safetensors", metadata={"format": "pt"})
    base, tuned = Checkpoint(finetuned.base), Checkpoint(poisoned)
    with pytest.raises(DeltaError, match=r"model\.layers\.2\.self_attn\.v_proj\.weight has 1 NaN/Inf"):
        for _ in iter_deltas(base, tuned):
            pass
