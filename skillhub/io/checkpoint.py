"""Base and tuned checkpoints: Hugging Face model directories read lazily, tensor by tensor."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from skillhub.errors import CheckpointError
from skillhub.io.jsonio import read_json
from skillhub.io.tensorfile import TensorFile, dtype_name

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files that travel with weights so the output of `apply` loads with from_pretrained.
SIDECAR_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class CheckpointRef:
    """Where a checkpoint came from, as recorded in manifests."""

    id: str
    revision: str | None
    source: str  # "local" or "hub"


class Checkpoint:
    """A Hugging Face causal-LM checkpoint directory holding safetensors weights.

    Only the safetensors headers are read on open; :meth:`read` loads one tensor.
    Use :func:`open_checkpoint` to also accept Hub ids.
    """

    def __init__(self, path: str | os.PathLike[str], *, ref: CheckpointRef | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a model directory")
        self.ref = ref or CheckpointRef(id=self.path.name, revision=None, source="local")
        self.config = self._read_config()
        self._files: dict[str, TensorFile] = {}
        self._where: dict[str, TensorFile] = {}
        for shard in self._shard_names():
            tensor_file = TensorFile(self.path / shard)
            self._files[shard] = tensor_file
            for name in tensor_file.keys():
                if name in self._where:
                    raise CheckpointError(f"{self.path}: tensor {name} is stored in two shards")
                self._where[name] = tensor_file

    def _read_config(self) -> dict[str, Any]:
        config_path = self.path / "config.json"
        if not config_path.exists():
            raise CheckpointError(f"{self.path} has no config.json: is it a Hugging Face model directory?")
        config = read_json(config_path, error=CheckpointError, expect=dict)
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path} is not a JSON object")
        architectures = config.get("architectures")
        if architectures is not None and not (
                isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)):
            raise CheckpointError(f"{config_path}: 'architectures' must be a list of class names")
        for key in ("model_type", "tie_word_embeddings", "text_config"):
            wanted = {"model_type": str, "tie_word_embeddings": bool, "text_config": dict}[key]
            if config.get(key) is not None and not isinstance(config[key], wanted):
                raise CheckpointError(f"{config_path}: {key!r} must be a {wanted.__name__}")
        return config

    def _shard_names(self) -> list[str]:
        index_path = self.path / INDEX_FILE
        if index_path.exists():
            index = read_json(index_path, error=CheckpointError, expect=dict)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise CheckpointError(f"{index_path} is not a valid safetensors index: 'weight_map' must map "
                                      "tensor names to shard file names")
            shards = sorted(set(weight_map.values()))
            outside = [s for s in shards if Path(s).name != s or not s.endswith(".safetensors")]
            if outside:
                raise CheckpointError(f"{index_path} names shard {outside[0]!r}, which is not a .safetensors file "
                                      "next to it")
            missing = [s for s in shards if not (self.path / s).is_file()]
            if missing:
                raise CheckpointError(f"{self.path} is missing shard(s) named in its index: {', '.join(missing)}")
            return shards
        if (self.path / SINGLE_FILE).is_file():
            return [SINGLE_FILE]
        others = sorted(p.name for p in self.path.glob("*.safetensors"))
        if others:
            return others
        pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{self.path} holds only pickle weights ({', '.join(pickles)}); skillhub never unpickles. "
                "Convert it once with `model.save_pretrained(dir, safe_serialization=True)` and use that directory"
            )
        raise CheckpointError(f"{self.path} holds no *.safetensors weights")

    @property
    def model_type(self) -> str | None:
        """``model_type`` from config.json (e.g. ``"llama"``)."""
        return self.config.get("model_type")

    @property
    def architecture(self) -> str | None:
        """First entry of ``architectures`` in config.json (e.g. ``"LlamaForCausalLM"``)."""
        archs = self.config.get("architectures") or [None]
        return archs[0]

    @property
    def tie_word_embeddings(self) -> bool:
        """Whether the head shares the embedding matrix (transformers' default is True)."""
        text_config = self.config.get("text_config") or {}
        return bool(self.config.get("tie_word_embeddings", text_config.get("tie_word_embeddings", True)))

    @property
    def vocab_size(self) -> int | None:
        """``vocab_size`` from config.json (or its ``text_config``): the word embedding's rows."""
        return config_value(self.config, "vocab_size")

    def names(self) -> list[str]:
        """Every tensor name, sorted."""
        return sorted(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name``."""
        return self._where[name].shape(name)

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of tensor ``name``."""
        return self._where[name].dtype(name)

    def read(self, name: str) -> torch.Tensor:
        """Load tensor ``name`` (and nothing else)."""
        return self._where[name].read(name)

    def read_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Load only ``rows`` (along the first axis) of tensor ``name``."""
        return self._where[name].read_rows(name, rows)

    def read_block(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Load rows ``start:stop`` of tensor ``name`` (what a streamed delta reads)."""
        return self._where[name].read_block(name, start, stop)

    def reads_blocks(self, name: str) -> bool:
        """Whether reading ``name`` a row block at a time costs no more than reading it whole."""
        return True

    def dominant_dtype(self) -> str:
        """The dtype most parameters are stored in, e.g. ``"bfloat16"``."""
        counts: dict[str, int] = {}
        for name in self._where:
            numel = 1
            for d in self.shape(name):
                numel *= d
            key = dtype_name(self.dtype(name))
            counts[key] = counts.get(key, 0) + numel
        return max(counts, key=counts.__getitem__) if counts else "float32"

    def sidecar_files(self) -> list[Path]:
        """Config and tokenizer files present next to the weights."""
        return [self.path / n for n in SIDECAR_FILES if (self.path / n).is_file()]


class PatchedCheckpoint(Checkpoint):
    """A checkpoint seen with deltas added: what its fine-tune would hold, without writing it.

    Patched tensors read as float32 (base + delta), so small deltas survive a bfloat16 base;
    every other tensor, the config and the files are the base's. Used to compress a delta that
    exists only as factors (a PEFT adapter) through the same pipeline as a fine-tune.
    """

    def __init__(self, base: Checkpoint, deltas: Mapping[str, Callable[[], torch.Tensor]], *,
                 ref: CheckpointRef) -> None:
        unknown = [name for name in deltas if name not in base]
        if unknown:
            raise CheckpointError(f"{base.path} has no tensor {unknown[0]} to patch")
        self.path, self.config, self.ref = base.path, base.config, ref
        self._files, self._where = base._files, base._where
        self._deltas = deltas

    def dtype(self, name: str) -> torch.dtype:
        return torch.float32 if name in self._deltas else super().dtype(name)

    def read(self, name: str) -> torch.Tensor:
        tensor = super().read(name)
        if name not in self._deltas:
            return tensor
        return tensor.to(torch.float32).add_(self._deltas[name]().reshape(tensor.shape))

    def read_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        if name not in self._deltas:
            return super().read_rows(name, rows)
        return self.read(name)[rows]

    def read_block(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name not in self._deltas:
            return super().read_block(name, start, stop)
        return self.read(name)[start:stop].clone()

    def reads_blocks(self, name: str) -> bool:
        return name not in self._deltas  # a patched tensor's delta is made whole, from its factors


class Fingerprint:
    """Content hash of a checkpoint's weights, independent of sharding and file layout.

    Feed it every tensor (in any order) while streaming; :meth:`hexdigest` combines the
    per-tensor hashes sorted by name, so the fingerprint costs no extra pass when the
    caller reads the weights anyway.
    """

    def __init__(self) -> None:
        self._lines: dict[str, str] = {}

    def update(self, name: str, tensor: torch.Tensor) -> None:
        """Hash one tensor's name, dtype, shape and raw bytes."""
        digest = hashlib.sha256()
        hash_bytes(digest, tensor)
        self.record(name, tensor.dtype, tuple(tensor.shape), digest)

    def record(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], digest: Any) -> None:
        """Take a tensor's hash made elsewhere (by :func:`hash_bytes`, a block at a time)."""
        self._lines[name] = f"{name} {dtype_name(dtype)} {list(shape)} {digest.hexdigest()}\n"

    def hexdigest(self) -> str:
        """``sha256:<hex>`` over every tensor fed so far."""
        combined = hashlib.sha256()
        for name in sorted(self._lines):
            combined.update(self._lines[name].encode("utf-8"))
        return "sha256:" + combined.hexdigest()


def config_value(config: Mapping[str, Any], *keys: str) -> Any:
    """The first of ``keys`` that config.json sets, else that its ``text_config`` sets (where
    multimodal models keep their language model's sizes); None if neither does."""
    text_config = config.get("text_config") or {}
    for scope in (config, text_config):
        for key in keys:
            if scope.get(key):
                return scope[key]
    return None


def hash_bytes(digest: Any, tensor: torch.Tensor) -> None:
    """Feed ``tensor``'s raw bytes to a hashlib ``digest`` (consecutive row blocks hash as the whole)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel():
        digest.update(memoryview(flat.view(torch.uint8).numpy()))


def fingerprint(checkpoint: Checkpoint) -> str:
    """Fingerprint of every tensor of ``checkpoint`` (one full read)."""
    fp = Fingerprint()
    for name in checkpoint.names():
        fp.update(name, checkpoint.read(name))
    return fp.hexdigest()


def open_checkpoint(ref: str | os.PathLike[str], *, revision: str | None = None) -> Checkpoint:
    """Open a local model directory, or download a Hub model's safetensors, config and tokenizer.

    Args:
        ref: A local directory, or a Hub id such as ``"meta-llama/Llama-3.1-8B"``.
        revision: Branch, tag or commit for Hub ids.

    Raises:
        CheckpointError: The directory is unusable, or ``ref`` is neither a directory nor a Hub id.
    """
    path = Path(ref)
    if path.is_dir():
        return Checkpoint(path)
    text = str(ref)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointError(f"{text} is neither a model directory nor a Hub id (OWNER/NAME)")
    # Imported here, not at module level: huggingface_hub reads HF_ENDPOINT when first
    # imported, and local-only work should not pay for (or freeze) that.
    from skillhub.io import hub

    local, commit = hub.download_snapshot(text, revision=revision, patterns=["*.safetensors", INDEX_FILE, *SIDECAR_FILES])
    if not any(local.glob("*.safetensors")):
        raise CheckpointError(
            f"Hub repo {text} has no safetensors weights; skillhub never unpickles *.bin files. "
            "Convert the model to safetensors and push that"
        )
    return Checkpoint(local, ref=CheckpointRef(id=text, revision=commit, source="hub"))
