"""Deltas too large to hold whole (issue 28): a 128k-vocabulary embedding at 8B width is 2 GB in
float32, so ``magnitude-prune`` encodes it from row blocks, with the bytes of the whole-tensor encode.
(Memory and time at that size: bench/bench_scale_model.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from skillhub import create_pack
from skillhub.compress.delta import RowBlocks, read_delta
from skillhub.errors import DeltaError, SkillhubError
from skillhub.io.checkpoint import Checkpoint, Fingerprint
from skillhub.io.tensorfile import TensorFile
from skillhub.pack.format import SkillPack
from skillhub.numerics.bitpack import PackedStream, pack_codes
from skillhub.numerics.quantize import StreamingQuantizer, quantize_rtn
from skillhub.numerics.selection import magnitude_threshold
from skillhub.operators import EncodeContext, encode_module, get_operator, resolve_params
from skillhub.testing import RowsInMemory

from conftest import FineTune
from test_scale import _pack_bytes


def _pieces(tensor: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """``tensor`` cut at random places, empty pieces included."""
    cuts = sorted(torch.randint(0, tensor.numel() + 1, (6,), generator=torch.Generator().manual_seed(seed)).tolist())
    return [tensor[a:b] for a, b in zip([0, *cuts], [*cuts, tensor.numel()])]


@pytest.mark.parametrize("bits", [1, 3, 4, 8, 13])
def test_codes_packed_as_they_arrive_are_packed_as_a_whole(bits: int) -> None:
    codes = torch.randint(0, 1 << bits, (1001,), generator=torch.Generator().manual_seed(bits))
    stream = PackedStream(codes.numel(), bits)
    for piece in _pieces(codes, bits):
        stream.add(piece)
    assert torch.equal(stream.finish(), pack_codes(codes, bits))
    short = PackedStream(codes.numel(), bits)
    short.add(codes[:-1])
    with pytest.raises(ValueError, match="1000 codes were packed where 1001"):
        short.finish()
    with pytest.raises(ValueError, match="more than the 1001 codes"):
        PackedStream(codes.numel(), bits).add(torch.cat([codes] * 2))


@pytest.mark.parametrize("count,group_size", [(1000, 128), (1000, 100), (1000, 4096), (7, 3)])
def test_values_quantized_as_they_arrive_are_quantized_as_a_whole(count: int, group_size: int) -> None:
    values = torch.randn(count, generator=torch.Generator().manual_seed(count))
    quantizer = StreamingQuantizer(count, bits=3, group_size=group_size, step=2 * group_size)
    for piece in _pieces(values, count):
        quantizer.add(piece)
    streamed = quantizer.finish()
    whole = quantize_rtn(values.reshape(1, -1), bits=3, group_size=group_size)
    for got, expected in zip(streamed, whole.packed()):
        assert torch.equal(got, expected)
    error = float(torch.linalg.vector_norm(values - whole.dequantize().reshape(-1), dtype=torch.float64)) ** 2
    assert quantizer.squared_error == pytest.approx(error, rel=1e-6)


def test_the_radix_threshold_is_kthvalue_exactly() -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(20000, generator=generator) * torch.logspace(-8, 2, 20000)
    values[::7] = torch.round(values[::7] * 4) / 4  # many exact ties, zeros among them
    blocks = _pieces(values, 1)
    for keep in (1, 17, 5000, 10000, 19999, 20000):
        threshold = magnitude_threshold(blocks, keep)
        expected = torch.kthvalue(values.abs(), values.numel() - keep + 1).values
        assert threshold.value == float(expected)
        greater = int((values.abs() > threshold.value).sum())
        assert greater + threshold.ties == keep and 1 <= threshold.ties <= int((values.abs() == expected).sum())
    with pytest.raises(ValueError, match="cannot keep 20001 of 20000"):
        magnitude_threshold(blocks, 20001)


@pytest.mark.parametrize("params", [
    {"keep": 0.5, "bits": 4}, {"keep": 0.03, "bits": 3, "group_size": 100}, {"keep": 0.2, "bits": 16},
    {"keep": 1.0, "bits": 4}, {"keep": 0.01, "bits": 8, "index": "bitmask"}, {"keep": 0.4, "bits": 2, "index": "gaps"},
    {"keep": 0.9, "bits": 2, "group_size": 100000},
])
def test_magnitude_prune_from_row_blocks_writes_the_whole_encode_byte_for_byte(params: dict) -> None:
    generator = torch.Generator().manual_seed(len(str(params)))
    delta = torch.randn(301, 77, generator=generator) * 1e-3
    delta[::3] = torch.round(delta[::3] * 2000) / 2000  # ties at the threshold, and zeros
    operator = get_operator("magnitude-prune")
    resolved = resolve_params(operator, params, where="test")
    ctx = EncodeContext(name="model.embed_tokens.weight", role="embedding")
    whole = encode_module(operator, delta, resolved, ctx)
    streamed = operator.encode_blocks(RowsInMemory(delta, rows=13), resolved, ctx)
    assert streamed.encoded.meta == whole.encoded.meta
    assert list(streamed.encoded.tensors) == list(whole.encoded.tensors)
    for field, tensor in whole.encoded.tensors.items():
        assert torch.equal(streamed.encoded.tensors[field], tensor), field
    assert streamed.squared_error**0.5 == pytest.approx(whole.error_norm, rel=1e-5)


def test_row_blocks_are_the_delta_read_whole(finetuned: FineTune) -> None:
    base, tuned = Checkpoint(finetuned.base), Checkpoint(finetuned.tuned)
    name = "model.embed_tokens.weight"
    whole_print, streamed_print = Fingerprint(), Fingerprint()
    whole = read_delta(base, tuned, name, whole_print)
    blocks = RowBlocks(base, tuned, name, fingerprint=streamed_print, block_elements=1000)
    assert blocks.changed() and blocks.squared_norm is None
    pieces = list(blocks)
    assert len(pieces) > 3 and torch.equal(torch.cat(pieces).reshape(whole.delta.shape), whole.delta)
    assert blocks.squared_norm == pytest.approx(float(whole.delta.double().square().sum()), rel=1e-9)
    assert streamed_print.hexdigest() == whole_print.hexdigest()
    same = RowBlocks(base, base, name, fingerprint=Fingerprint(), block_elements=1000)
    assert not same.changed() and same.squared_norm == 0.0


def test_a_non_finite_block_names_its_rows(finetuned: FineTune, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(finetuned.tuned, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.embed_tokens.weight"][40, 3] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    rows = 1000 // Checkpoint(broken).shape("model.embed_tokens.weight")[1]
    blocks = RowBlocks(Checkpoint(finetuned.base), Checkpoint(broken), "model.embed_tokens.weight", block_elements=1000)
    start = 40 // rows * rows
    with pytest.raises(DeltaError, match=rf"embed_tokens.weight has NaN/Inf values \(rows {start}:{start + rows}\)"):
        list(blocks)


def _errors_apart(content: dict) -> tuple[dict, list[float]]:
    """A pack's bytes (see test_scale) less its error figures, and those figures (the manifest and
    the copy of it in the tensor file's header): row blocks add their squares in another order."""
    errors: list[float] = []
    manifests = [content["manifest"]] + [value[0]["__metadata__"]["skillpack"] for value in content.values()
                                         if isinstance(value, tuple)]
    for manifest in manifests:
        errors.append(manifest["totals"].pop("relative_error"))
        errors.extend(module.pop("error") for module in manifest["modules"].values())
    return content, errors


@pytest.fixture(scope="module")
def whole(finetuned: FineTune, tmp_path_factory: pytest.TempPathFactory) -> SkillPack:
    """The tiny fine-tune's pack, every delta held whole."""
    return create_pack(finetuned.base, finetuned.tuned, tmp_path_factory.mktemp("whole") / "p", name="p", task="shift")


@pytest.mark.parametrize("workers", [1, 2])
def test_create_streams_large_deltas_into_the_same_pack(finetuned: FineTune, whole: SkillPack, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    read_whole: list[str] = []
    real_read = TensorFile.read

    def recording_read(self: TensorFile, name: str) -> torch.Tensor:
        read_whole.append(name)
        return real_read(self, name)

    monkeypatch.setattr(TensorFile, "read", recording_read)
    monkeypatch.setenv("SKILLHUB_STREAM_ABOVE_MIB", "0.01")  # 10 KiB: the tiny model's embedding and head
    streamed = create_pack(finetuned.base, finetuned.tuned, tmp_path / "streamed", name="p", task="shift",
                           workers=workers)
    pruned = [n for n, m in whole.manifest["modules"].items() if m["operator"] == "magnitude-prune"]
    assert pruned and not set(pruned) & set(read_whole)  # read a block at a time only
    assert any(m["operator"] == "svd-mixed" for m in whole.manifest["modules"].values())
    expected, expected_errors = _errors_apart(_pack_bytes(whole.path))
    content, errors = _errors_apart(_pack_bytes(streamed.path))
    assert content == expected
    assert errors == pytest.approx(expected_errors, rel=1e-5) and len(errors) > 2


def test_a_bad_stream_threshold_is_refused_before_anything_is_written(finetuned: FineTune, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKILLHUB_STREAM_ABOVE_MIB", "lots")
    with pytest.raises(SkillhubError, match="SKILLHUB_STREAM_ABOVE_MIB='lots' is not a number of MiB >= 0"):
        create_pack(finetuned.base, finetuned.tuned, tmp_path / "p", task="shift")
    assert not (tmp_path / "p").exists()
