"""Tests for skillhub.io.tensorfile: streaming safetensors I/O, checked against the safetensors library
in both directions."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import save_file

from skillhub.errors import CheckpointError
from skillhub.io.tensorfile import TensorFile, TensorFileWriter, dtype_from_name, dtype_name


def sample_tensors() -> dict[str, torch.Tensor]:
    """One tensor per supported dtype of interest, odd sizes so data offsets are unaligned."""
    gen = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=gen),
        "f16": torch.randn(7, generator=gen).half(),
        "bf16": torch.randn(2, 3, generator=gen).bfloat16(),
        "u8": torch.randint(0, 256, (11,), generator=gen, dtype=torch.uint8),
        "i64": torch.randint(-(2**62), 2**62, (2, 2), generator=gen, dtype=torch.int64),
        "bool": torch.rand(13, generator=gen) > 0.5,
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3.25),
    }


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert tuple(actual.shape) == tuple(expected.shape)
    assert torch.equal(actual, expected)


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    writer = TensorFileWriter(path)
    writer.add_all(tensors)
    return writer.finish(metadata)


def data_start(path: Path) -> int:
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + header_len


def test_writer_output_reads_with_safetensors(tmp_path: Path) -> None:
    tensors = sample_tensors()
    metadata = {"format": "pt", "skill": "shift", "note": "ünïcode ✓"}
    path = write(tmp_path / "out.safetensors", tensors, metadata)
    with safetensors.safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(tensors)
        assert f.metadata() == metadata
        for name, expected in tensors.items():
            assert_same(f.get_tensor(name), expected)


def test_writer_without_metadata(tmp_path: Path) -> None:
    path = write(tmp_path / "out.safetensors", {"x": torch.arange(5, dtype=torch.int64)})
    with safetensors.safe_open(str(path), "pt") as f:
        assert not f.metadata()
        assert_same(f.get_tensor("x"), torch.arange(5, dtype=torch.int64))
    assert TensorFile(path).metadata == {}


def test_writer_round_trip_through_tensorfile(tmp_path: Path) -> None:
    tensors = sample_tensors()
    writer = TensorFileWriter(tmp_path / "out.safetensors")
    writer.add_all(tensors)
    assert writer.data_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    path = writer.finish({"a": "b"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]  # spill file removed
    reader = TensorFile(path)
    assert reader.keys() == list(tensors)  # header order is insertion order
    assert reader.metadata == {"a": "b"}
    for name, expected in tensors.items():
        assert name in reader
        assert reader.dtype(name) == expected.dtype
        assert reader.shape(name) == tuple(expected.shape)
        assert reader.nbytes(name) == expected.numel() * expected.element_size()
        assert_same(reader.read(name), expected)
    assert "missing" not in reader


def test_writer_handles_non_contiguous_tensors(tmp_path: Path) -> None:
    source = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    path = write(tmp_path / "out.safetensors", {"t": source.T, "s": source[:, ::2]})
    reader = TensorFile(path)
    assert_same(reader.read("t"), source.T.contiguous())
    assert_same(reader.read("s"), source[:, ::2].contiguous())


def test_safetensors_output_reads_with_tensorfile(tmp_path: Path) -> None:
    tensors = sample_tensors()
    metadata = {"format": "pt", "k": "v"}
    path = tmp_path / "ref.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    reader = TensorFile(path)
    assert set(reader.keys()) == set(tensors)
    assert reader.metadata == metadata
    for name, expected in tensors.items():
        assert reader.dtype(name) == expected.dtype
        assert reader.shape(name) == tuple(expected.shape)
        assert reader.nbytes(name) == expected.numel() * expected.element_size()
        assert_same(reader.read(name), expected)


def test_read_returns_independent_tensors(tmp_path: Path) -> None:
    """Each read is a fresh tensor: mutating one does not change the file or the next read."""
    path = write(tmp_path / "out.safetensors", {"x": torch.ones(4)})
    reader = TensorFile(path)
    first = reader.read("x")
    first += 1
    assert_same(reader.read("x"), torch.ones(4))


@pytest.mark.parametrize("metadata_len", range(9))
def test_data_start_is_8_byte_aligned(tmp_path: Path, metadata_len: int) -> None:
    """Metadata of every length modulo 8 still leaves the data 8-byte aligned."""
    path = write(tmp_path / "out.safetensors", {"u8": torch.arange(3, dtype=torch.uint8)},
                 {"m": "x" * metadata_len})
    assert data_start(path) % 8 == 0
    header = json.loads(path.read_bytes()[8:data_start(path)])
    assert header["u8"]["data_offsets"] == [0, 3]
    assert TensorFile(path).read("u8").tolist() == [0, 1, 2]


@pytest.mark.parametrize("cut", [1, 3, 40])
def test_truncated_file_is_refused(tmp_path: Path, cut: int) -> None:
    path = write(tmp_path / "out.safetensors", sample_tensors(), {"format": "pt"})
    data = path.read_bytes()
    assert len(data) - cut > data_start(path)  # the cut is in the tensor data, not the header
    path.write_bytes(data[:-cut])
    with pytest.raises(CheckpointError, match="truncated"):
        TensorFile(path)


def test_file_cut_inside_header_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "out.safetensors", sample_tensors())
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CheckpointError):
        TensorFile(path)


def _with_header(header: object, data: bytes = b"\0" * 16) -> bytes:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data


GARBAGE: dict[str, bytes] = {
    "empty": b"",
    "short": b"\x01\x02\x03",
    "text": b"this is certainly not a safetensors file, just some text\n" * 4,
    "random": bytes(torch.randint(0, 256, (256,), generator=torch.Generator().manual_seed(1),
                                  dtype=torch.uint8).tolist()),
    "zero header": struct.pack("<Q", 0) + b"\0" * 16,
    "header not json": struct.pack("<Q", 8) + b"{{{{{{{{" + b"\0" * 8,
    "header not utf-8": struct.pack("<Q", 8) + b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8",
    "header is a list": _with_header([1, 2, 3]),
    "entry not a map": _with_header({"x": 5}),
    "unknown dtype": _with_header({"x": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 2]}}),
    "missing offsets": _with_header({"x": {"dtype": "F32", "shape": [2]}}),
    "offsets disagree with shape": _with_header({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}),
    "three offsets": _with_header({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}),
    "negative begin": _with_header({"x": {"dtype": "U8", "shape": [2], "data_offsets": [-2, 0]}}),
    "data past the end": _with_header({"x": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}),
}


@pytest.mark.parametrize("content", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        TensorFile(path)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        TensorFile(tmp_path / "absent.safetensors")


def test_negative_dimension_is_refused(tmp_path: Path) -> None:
    """shape [-1] with offsets [0, -4] passes the size check (-1 * 4 == -4) unless dims are checked;
    the file must be refused up front, not fail later with a bare ValueError in read()."""
    path = tmp_path / "neg.safetensors"
    path.write_bytes(_with_header({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, -4]}}))
    with pytest.raises(CheckpointError):
        TensorFile(path).read("x")


def test_metadata_must_be_a_map(tmp_path: Path) -> None:
    """safetensors itself refuses a non-object __metadata__; TensorFile.metadata is a dict[str, str]."""
    path = tmp_path / "meta.safetensors"
    path.write_bytes(_with_header({"__metadata__": 5, "x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}))
    with pytest.raises(CheckpointError):
        TensorFile(path)


def test_abort_leaves_nothing_behind(tmp_path: Path) -> None:
    writer = TensorFileWriter(tmp_path / "out.safetensors")
    writer.add_all(sample_tensors())
    assert any(tmp_path.iterdir())  # the spill file exists while writing
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_abort_before_any_tensor(tmp_path: Path) -> None:
    TensorFileWriter(tmp_path / "out.safetensors").abort()
    assert list(tmp_path.iterdir()) == []


def test_same_name_twice_is_refused(tmp_path: Path) -> None:
    writer = TensorFileWriter(tmp_path / "out.safetensors")
    writer.add("x", torch.ones(2))
    with pytest.raises(ValueError, match="'x'"):
        writer.add("x", torch.zeros(2))
    path = writer.finish()
    assert_same(TensorFile(path).read("x"), torch.ones(2))  # the first one stands


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16", "uint8", "int64", "bool"])
def test_dtype_names_round_trip(name: str) -> None:
    assert dtype_name(dtype_from_name(name)) == name


@pytest.mark.parametrize("name", ["Tensor", "nn", "randn", "nope", "float128"])
def test_dtype_from_name_refuses_non_dtypes(name: str) -> None:
    with pytest.raises(ValueError):
        dtype_from_name(name)
