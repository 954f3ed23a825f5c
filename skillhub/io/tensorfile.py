"""Streaming safetensors I/O: one tensor at a time in, one tensor at a time out.

Reading uses positioned reads instead of keeping the file memory-mapped: pages of an
mmap that a reader has touched stay resident and count towards the process's RSS, so
reading a 1 GiB file through ``safetensors.safe_open`` peaks at ~1.2 GiB RSS, while
positioned reads stay at the size of the largest tensor (measured in bench/). The
header is validated against the file size first, so a truncated file is an error up
front rather than garbage later.

Writing streams tensor bytes to a spill file and assembles header + data at the end,
so a writer never holds more than one tensor. The result is an ordinary safetensors
file (8-byte little-endian header length, JSON header, aligned data) that
``safetensors.safe_open`` reads; the tests check both directions.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from skillhub.errors import CheckpointError
from skillhub.io.jsonio import parse_json

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def _count(value: object) -> int:
    """A header's dimension or offset: a non-negative JSON integer (not 1e400, not true)."""
    if type(value) is not int or value < 0:
        raise ValueError(f"not a non-negative integer: {value!r}"[:80])
    return value


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """``"float16"`` -> ``torch.float16``; raises ValueError for anything else."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype


class TensorFile:
    """Index of one safetensors file; tensors are read on demand, one at a time.

    Args:
        path: The ``.safetensors`` file.

    Raises:
        CheckpointError: The file is not a complete, well-formed safetensors file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as handle:
                prefix = handle.read(8)
                if len(prefix) < 8:
                    raise self._broken("shorter than a safetensors header")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > min(_MAX_HEADER, size - 8):
                    raise self._broken(f"header claims {header_len} bytes but the file has {size}")
                header_bytes = handle.read(header_len)
        except OSError as exc:
            raise self._broken(f"unreadable header ({exc})") from exc
        header = parse_json(header_bytes, what=f"{self.path} is not a valid safetensors file: its header",
                            error=CheckpointError)
        if not isinstance(header, dict):
            raise self._broken("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise self._broken("__metadata__ is not a map of strings")
        self.metadata: dict[str, str] = metadata
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            try:
                dtype = _DTYPES[entry["dtype"]]
                shape = tuple(_count(d) for d in entry["shape"])
                begin, end = (_count(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise self._broken(f"bad header entry for tensor {name!r}") from exc
            numel = 1
            for d in shape:
                numel *= d
            if any(d < 0 for d in shape) or begin < 0 or end - begin != numel * dtype.itemsize:
                raise self._broken(f"tensor {name!r} has inconsistent offsets")
            if self._data_start + end > size:
                raise self._broken(
                    f"tensor {name!r} ends at byte {self._data_start + end} but the file has only {size} "
                    "(truncated download or copy?)"
                )
            self._entries[name] = (dtype, shape, begin, end)

    def _broken(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is not a valid safetensors file: {why}")

    def keys(self) -> list[str]:
        """Tensor names in header order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of tensor ``name``."""
        return self._entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name``."""
        return self._entries[name][1]

    def nbytes(self, name: str) -> int:
        """Stored bytes of tensor ``name``."""
        _, _, begin, end = self._entries[name]
        return end - begin

    def read(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` into a fresh CPU tensor (no mmap stays behind)."""
        dtype, shape, begin, end = self._entries[name]
        buffer = bytearray(end - begin)
        with open(self.path, "rb") as handle:
            handle.seek(self._data_start + begin)
            if handle.readinto(buffer) != len(buffer):
                raise self._broken(f"tensor {name!r} is cut short")
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def read_block(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Read rows ``start:stop`` (along the first axis) of tensor ``name``, in one read."""
        dtype, shape, begin, end = self._entries[name]
        if not shape or not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"tensor {name!r} of shape {list(shape)} has no rows {start}:{stop}")
        row_bytes = (end - begin) // shape[0] if shape[0] else 0
        buffer = bytearray(row_bytes * (stop - start))
        with open(self.path, "rb") as handle:
            handle.seek(self._data_start + begin + start * row_bytes)
            if handle.readinto(buffer) != len(buffer):
                raise self._broken(f"tensor {name!r} is cut short")
        if not buffer:
            return torch.empty((stop - start, *shape[1:]), dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(stop - start, *shape[1:])

    def read_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Read only ``rows`` (indices along the first axis) of tensor ``name``: the vocabulary
        rows a calibration set uses, say, out of a 128k-row embedding."""
        dtype, shape, begin, end = self._entries[name]
        if not shape:
            raise self._broken(f"tensor {name!r} is a scalar and has no rows")
        row_bytes = (end - begin) // shape[0] if shape[0] else 0
        if any(not 0 <= row < shape[0] for row in rows):
            raise ValueError(f"tensor {name!r} has {shape[0]} rows; asked for rows outside that")
        buffer = bytearray(row_bytes * len(rows))
        with open(self.path, "rb") as handle:
            for index, row in enumerate(rows):
                handle.seek(self._data_start + begin + row * row_bytes)
                if handle.readinto(memoryview(buffer)[index * row_bytes:(index + 1) * row_bytes]) != row_bytes:
                    raise self._broken(f"tensor {name!r} is cut short")
        if not buffer:
            return torch.empty((len(rows), *shape[1:]), dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(len(rows), *shape[1:])


class TensorFileWriter:
    """Write a safetensors file one tensor at a time.

    Tensors go to ``<path>.data`` as they arrive; :meth:`finish` writes the header and
    the data into ``path``. Callers write into a temporary directory and rename, so a
    failure never leaves a half-written file under its final name.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._spill_path = self.path.with_name(self.path.name + ".data")
        self._spill = open(self._spill_path, "wb")
        self._header: dict[str, dict[str, object]] = {}
        self._offset = 0

    @property
    def data_bytes(self) -> int:
        """Tensor bytes written so far."""
        return self._offset

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor; its bytes are written immediately."""
        if name in self._header:
            raise ValueError(f"tensor {name!r} written twice")
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes:
            self._spill.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        self._header[name] = {
            "dtype": _CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._offset, self._offset + nbytes],
        }
        self._offset += nbytes

    def add_all(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Append several tensors in the mapping's order."""
        for name, tensor in tensors.items():
            self.add(name, tensor)

    def finish(self, metadata: Mapping[str, str] | None = None) -> Path:
        """Write the final file and remove the spill file.

        Args:
            metadata: String-to-string metadata stored under ``__metadata__``.

        Returns:
            The path of the finished file.
        """
        self._spill.close()
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        header.update(self._header)
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)  # keep tensor data 8-byte aligned
        with open(self.path, "wb") as out, open(self._spill_path, "rb") as spill:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            shutil.copyfileobj(spill, out, 16 * 1024 * 1024)
        self._spill_path.unlink()
        return self.path

    def abort(self) -> None:
        """Drop everything written so far."""
        self._spill.close()
        self._spill_path.unlink(missing_ok=True)
