"""Calibration capture on the real forward pass, calibration files, and GPTQ packs end to end."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from skillhub import create_pack
from skillhub.compress.calibrate import (
    CalibrationError,
    StatisticsCursor,
    capture_statistics,
    layer_order,
    load_for_calibration,
)
from skillhub.compress.windows import build_calibration_set, read_calibration_records
from skillhub.io.checkpoint import Checkpoint

from conftest import FineTune, hessians_agree, plain_model

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _calibration(finetuned: FineTune, samples: int = 8, seqlen: int = 32):
    tokenizer = AutoTokenizer.from_pretrained(finetuned.tuned)
    return build_calibration_set(finetuned.calib, tokenizer, samples=samples, seqlen=seqlen)


def test_captured_inputs_equal_those_of_a_plain_forward(finetuned: FineTune) -> None:
    """Layer-by-layer replay sees exactly what every linear layer sees in model(input_ids)."""
    lazy = load_for_calibration(finetuned.tuned, device="cpu")
    calibration = _calibration(finetuned)
    captured = {}
    for _, statistics in capture_statistics(lazy, calibration, batch_size=3):
        captured.update(statistics)
    model = plain_model(finetuned.tuned)

    plain: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            def hook(module, args, key=f"{name}.weight"):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                plain[key] = plain.get(key, 0) + x.T @ x
                counts[key] = counts.get(key, 0) + x.shape[0]
            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in calibration.input_ids.split(3):
            model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()

    assert set(captured) == set(plain) and len(plain) == 4 * 7 + 1
    for name, statistics in captured.items():
        assert statistics.samples == counts[name] == 8 * 32
        expected = 2.0 / counts[name] * plain[name]
        assert hessians_agree(statistics.hessian, expected), name


def test_statistics_come_one_layer_at_a_time_in_order(finetuned: FineTune) -> None:
    model = load_for_calibration(finetuned.tuned, device="cpu")
    yielded = [(index, sorted(stats)) for index, stats in capture_statistics(model, _calibration(finetuned))]
    assert [index for index, _ in yielded] == [0, 1, 2, 3, None]
    for index, names in yielded[:-1]:
        assert names == sorted(f"model.layers.{index}.{linear}.weight" for linear in LINEARS)
    assert yielded[-1][1] == ["lm_head.weight"]


def test_cursor_walks_parameters_in_layer_order(finetuned: FineTune) -> None:
    model = load_for_calibration(finetuned.tuned, device="cpu")
    cursor = StatisticsCursor(capture_statistics(model, _calibration(finetuned)))
    names = layer_order(Checkpoint(finetuned.base).names())
    assert names[0].startswith("model.layers.0.") and names[-1] == "model.norm.weight"
    found = {name: cursor.get(name) for name in names}
    assert found["model.layers.3.mlp.down_proj.weight"].hessian.shape == (384, 384)
    assert found["lm_head.weight"].hessian.shape == (128, 128)
    assert found["model.layers.0.input_layernorm.weight"] is None
    assert found["model.embed_tokens.weight"] is None
    shared = [found[f"model.layers.3.self_attn.{m}_proj.weight"] for m in "qkv"]
    assert shared[0].hessian is shared[1].hessian and not any(stats.exclusive for stats in shared)
    assert found["model.layers.3.mlp.down_proj.weight"].exclusive and found["lm_head.weight"].exclusive


def test_a_handed_out_hessian_is_held_by_its_receiver_alone(finetuned: FineTune) -> None:
    """Once a module's statistics are handed out and used, its Hessian is freed before the next
    layer is captured: two layers' Hessians (822 MB each at 8B width) are never held together."""
    model = load_for_calibration(finetuned.tuned, device="cpu")
    cursor = StatisticsCursor(capture_statistics(model, _calibration(finetuned)))
    statistics = cursor.get("model.layers.0.mlp.down_proj.weight")
    handed_out = weakref.ref(statistics.hessian)
    del statistics
    gc.collect()
    assert handed_out() is None


def test_calibration_files(tmp_path: Path) -> None:
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "hello"}\n\n{"prompt": "a=", "answer": "b"}\n')
    assert read_calibration_records(jsonl) == [{"text": "hello"}, {"prompt": "a=", "answer": "b"}]
    plain = tmp_path / "c.txt"
    plain.write_text("some plain text\nover two lines\n")
    assert read_calibration_records(plain) == [{"text": "some plain text\nover two lines\n"}]


@pytest.mark.parametrize(("content", "message"), [
    ("", "calibration file {path} is empty"),
    ('{"text": "ok"}\n{"title": "x"}\n', "calibration file {path} line 2 has no usable 'text' or 'prompt' field"),
    ('{"text": "ok"}\nnot json\n', "calibration file {path} line 2 is not valid JSON"),
])
def test_bad_calibration_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "calib.jsonl"
    path.write_text(content)
    with pytest.raises(CalibrationError, match=message.format(path=path).replace("(", r"\(").replace(")", r"\)")):
        read_calibration_records(path)


def test_calibration_shorter_than_needed(finetuned: FineTune) -> None:
    tokenizer = AutoTokenizer.from_pretrained(finetuned.tuned)
    with pytest.raises(CalibrationError, match=r"yields \d+ tokens but 5000 samples x 512 tokens need 2560000"):
        build_calibration_set(finetuned.calib, tokenizer, samples=5000, seqlen=512)


def test_gptq_pack_records_its_calibration_and_beats_rtn(finetuned: FineTune, tmp_path: Path) -> None:
    """On held-out inputs, GPTQ's layer outputs are closer to the fine-tune's than round-to-nearest's."""
    options = {"calib": finetuned.calib, "calib_samples": 32, "calib_seqlen": 64}
    gptq = create_pack(finetuned.base, finetuned.tuned, tmp_path / "gptq", task="shift", **options)
    rtn = create_pack(finetuned.base, finetuned.tuned, tmp_path / "rtn", task="shift")
    source = gptq.manifest["quantizer"]
    assert source["method"] == "gptq" and source["calibration"]["samples"] == 32
    assert source["calibration"]["file"] == "calib.jsonl" and len(source["calibration"]["sha256"]) == 64
    assert gptq.modules["model.layers.1.mlp.up_proj.weight"].meta["quantizer"] == "gptq"
    assert gptq.manifest["totals"]["stored_bytes"] == rtn.manifest["totals"]["stored_bytes"]

    model = load_for_calibration(finetuned.tuned, device="cpu")
    heldout = build_calibration_set(finetuned.heldout, AutoTokenizer.from_pretrained(finetuned.tuned),
                                    samples=16, seqlen=64)
    base, tuned = Checkpoint(finetuned.base), Checkpoint(finetuned.tuned)
    wins = 0
    compared = 0
    for _, statistics in capture_statistics(model, heldout):
        for name, stats in statistics.items():
            if gptq.modules[name].operator != "svd-mixed":
                continue
            delta = tuned.read(name).double() - base.read(name).double()
            errors = []
            for pack in (gptq, rtn):
                residual = delta - pack.decode(name).double()
                errors.append(float(torch.einsum("ij,jk,ik->", residual, stats.hessian.double(), residual)))
            wins += errors[0] < errors[1]
            compared += 1
    assert compared == 28 and wins == compared


def test_bad_calibration_writes_nothing(finetuned: FineTune, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CalibrationError, match="is empty"):
        create_pack(finetuned.base, finetuned.tuned, tmp_path / "pack", calib=empty)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]


def test_a_tokenizer_beyond_the_embedding_is_refused_before_anything_is_written(finetuned: FineTune,
                                                                              tmp_path: Path) -> None:
    """A tokenizer of another model gives ids the embedding has no row for: one line, nothing written."""
    tuned = tmp_path / "tuned"
    shutil.copytree(finetuned.tuned, tuned)
    config = json.loads((tuned / "config.json").read_text())
    (tuned / "config.json").write_text(json.dumps({**config, "vocab_size": 10}))
    with pytest.raises(CalibrationError, match=r"into token id \d+, but its embedding has 10 rows"):
        create_pack(finetuned.base, tuned, tmp_path / "pack", calib=finetuned.calib, calib_samples=8, calib_seqlen=32)
    assert not (tmp_path / "pack").exists()


def test_an_abandoned_capture_leaves_autograd_on(finetuned: FineTune) -> None:
    """Grad mode is process state: stopping halfway through the layers must not leave it off."""
    model = load_for_calibration(finetuned.tuned, device="cpu")
    statistics = capture_statistics(model, _calibration(finetuned))
    next(statistics)
    assert torch.is_grad_enabled()
    statistics.close()
    assert torch.is_grad_enabled()


def test_calibration_reads_one_layer_at_a_time_and_never_the_vocabulary_matrices(finetuned: FineTune) -> None:
    """Flat memory (issue 16): the model is built without weights; one decoder layer is read at a
    time and released before the next; the embedding is read only at the rows the windows use,
    and the head never."""
    lazy = load_for_calibration(finetuned.tuned, device="cpu")
    assert all(p.is_meta for p in lazy.model.parameters())
    reads: list[str] = []
    original_read, original_rows, original_materialize = (lazy.checkpoint.read, lazy.checkpoint.read_rows,
                                                           lazy.materialize)
    lazy.checkpoint.read = lambda name: reads.append(name) or original_read(name)
    rows: list[list[int]] = []
    lazy.checkpoint.read_rows = lambda name, wanted: rows.append(wanted) or original_rows(name, wanted)
    layers_read: list[set[str]] = []

    def materialize(names, **options):
        real = {n.split(".")[2] for n, p in lazy.model.named_parameters() if not p.is_meta and ".layers." in n}
        wanted = {n.split(".")[2] for n in names if ".layers." in n}
        assert not real or not wanted, (real, wanted)  # a layer is read only once the previous one is released
        layers_read.append(wanted)
        original_materialize(names, **options)

    lazy.materialize = materialize
    calibration = _calibration(finetuned)
    yielded = [index for index, _ in capture_statistics(lazy, calibration, batch_size=3)]
    assert yielded == [0, 1, 2, 3, None]
    assert [w for w in layers_read if w] == [{"0"}, {"1"}, {"2"}, {"3"}]
    assert "lm_head.weight" not in reads and "model.embed_tokens.weight" not in reads
    batches = calibration.input_ids.split(3)
    assert rows == [sorted(set(batch.flatten().tolist())) for batch in batches]
    layer_reads = [name for name in reads if ".layers." in name]
    assert sorted(layer_reads) == sorted(n for n in Checkpoint(finetuned.tuned).names() if ".layers." in n)
    assert all(p.is_meta for p in lazy.model.parameters())  # nothing stays behind


def test_rows_of_a_stored_tensor_are_read_alone(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from skillhub.io.tensorfile import TensorFile

    table = torch.arange(40 * 6, dtype=torch.bfloat16).reshape(40, 6)
    save_file({"a": torch.ones(3), "table": table}, str(tmp_path / "t.safetensors"))
    stored = TensorFile(tmp_path / "t.safetensors")
    assert torch.equal(stored.read_rows("table", [0, 7, 39]), table[[0, 7, 39]])
    assert stored.read_rows("table", []).shape == (0, 6)
    with pytest.raises(ValueError, match="40 rows"):
        stored.read_rows("table", [40])
