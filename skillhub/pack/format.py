"""The SkillPack on disk (format v1); the only module that reads or writes pack files.

A pack is a directory holding ``skillpack.json`` (the manifest), ``skillpack.safetensors``
(every stored tensor, keys ``<parameter name>/<field>``, with the manifest embedded in the
safetensors metadata under ``skillpack``) and ``README.md`` (a model card). Packs are built
in a temporary sibling directory and renamed into place (:mod:`skillhub.io.outputs`), so a
failed build leaves nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from skillhub.errors import OperatorError, PackError, SkillhubError
from skillhub.io.jsonio import parse_json, read_json
from skillhub.pack.manifest import (
    CARD_FILE,
    MANIFEST_FILE,
    TENSORS_FILE,
    Manifest,
    ModuleEntry,
    embedded_part,
    validate_manifest,
)
from skillhub.operators import (
    Operator,
    Split,
    decode_split,
    decoder_for,
    expected_split_fields,
    resolve_params,
)
from skillhub.io.tensorfile import TensorFile, TensorFileWriter, dtype_name

METADATA_KEY = "skillpack"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(16 * 1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


class PackWriter:
    """Accumulates the tensors of a pack being built inside a staging directory."""

    def __init__(self, staging: Path) -> None:
        self.staging = staging
        self._tensors = TensorFileWriter(staging / TENSORS_FILE)

    def add_module(self, name: str, tensors: Mapping[str, torch.Tensor]) -> int:
        """Store the fields of one module; returns the bytes they take."""
        before = self._tensors.data_bytes
        for field, tensor in tensors.items():
            self._tensors.add(f"{name}/{field}", tensor)
        return self._tensors.data_bytes - before

    def finish(self, manifest: dict[str, Any], card: str) -> Manifest:
        """Write the tensor file (manifest embedded), the card and skillpack.json.

        Returns:
            The complete manifest, with ``files`` filled in.
        """
        core = embedded_part(manifest)
        validate_manifest(core, what="the new pack's manifest", embedded=True)
        self._tensors.finish({METADATA_KEY: json.dumps(core, separators=(",", ":")), "format": "pt"})
        (self.staging / CARD_FILE).write_text(card, encoding="utf-8")
        complete = dict(core)
        complete["files"] = {
            name: {"bytes": (self.staging / name).stat().st_size, "sha256": sha256_file(self.staging / name)}
            for name in (TENSORS_FILE, CARD_FILE)
        }
        validate_manifest(complete, what="the new pack's manifest")
        write_manifest(self.staging, complete)
        return Manifest(complete)


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write skillpack.json (via a temporary name, then rename)."""
    temporary = directory / f".{MANIFEST_FILE}.tmp"
    temporary.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    temporary.replace(directory / MANIFEST_FILE)


class SkillPack:
    """A SkillPack directory opened for reading. Use :func:`load_pack`."""

    def __init__(self, path: Path, manifest: dict[str, Any], tensors: TensorFile) -> None:
        self.path = path
        self.manifest = manifest if isinstance(manifest, Manifest) else Manifest(manifest)
        self.modules: dict[str, ModuleEntry] = self.manifest.modules()  # per-parameter entries, typed
        self._tensors = tensors
        self._resolved: dict[str, dict[str, Any]] = {}  # params checked against the operator schema

    @property
    def name(self) -> str:
        """Pack name."""
        return self.manifest.name

    @property
    def task(self) -> str:
        """Task the pack teaches."""
        return self.manifest.task

    @property
    def version(self) -> str:
        """Pack version."""
        return self.manifest.version

    @property
    def base_fingerprint(self) -> str:
        """Fingerprint of the base model the delta was taken against."""
        return self.manifest.base.fingerprint

    def fields(self, module: str) -> dict[str, torch.Tensor]:
        """The stored tensors of one module, keyed by field name."""
        return {field: self._tensors.read(f"{module}/{field}") for field in self.modules[module].fields}

    def require_operators(self) -> None:
        """Check, before any tensor is decoded, that every operator this pack needs is installed
        at a version that decodes it.

        Raises:
            OperatorError: Naming the operator, the version and the distribution to install.
        """
        needed = {(e.operator, e.operator_version): module for module, e in self.modules.items()}
        for module in sorted(needed.values()):
            self._decoder(module)

    def check_decodable(self, *, decode: bool = False) -> None:
        """Check, before anything is decoded into a model, that every module can be: its operator is
        installed, its params pass the operator's schema, and its meta and stored tensors (names,
        dtypes, shapes) are what the operator lays out for it. With ``decode``, also decode every
        module once (what a registry does on ``add``: see :meth:`decode` for what that checks).

        Raises:
            OperatorError: An operator is missing (naming what to install).
            PackError: Naming the module and what does not fit.
        """
        self.require_operators()
        for module in sorted(self.modules):
            self._check_layout(module)
            if decode:
                self.decode(module)

    def _check_layout(self, module: str) -> None:
        entry, where = self.modules[module], f"pack {self.name!r} module {module}"
        operator = self._decoder(module)
        params = self._params(module, operator)
        try:
            layout = expected_split_fields(operator, entry.meta, params, entry.shape, self._split(module),
                                           version=entry.operator_version)
        except ValueError as exc:
            raise PackError(f"{where}: its meta does not fit operator {operator.name}: {exc}") from exc
        if layout is None:
            return  # a plugin without expected_fields: decoding checks it
        if set(layout) != set(entry.fields):
            raise PackError(f"{where} stores fields {sorted(entry.fields)}, operator {operator.name} "
                            f"reads {sorted(layout)}")
        for field, (dtype, shape) in layout.items():
            key = f"{module}/{field}"
            stored = (self._tensors.dtype(key), tuple(self._tensors.shape(key)))
            if stored != (dtype, tuple(shape)):
                raise PackError(f"{where} field {field} is stored as {dtype_name(stored[0])} {list(stored[1])}, "
                                f"operator {operator.name} writes {dtype_name(dtype)} {list(shape)}")

    def _params(self, module: str, operator: Operator) -> dict[str, Any]:
        if module not in self._resolved:
            try:
                self._resolved[module] = resolve_params(operator, self.modules[module].params,
                                                        where=f"pack {self.name!r} module {module}")
            except OperatorError as exc:
                raise PackError(str(exc)) from exc
        return self._resolved[module]

    def _split(self, module: str) -> Split | None:
        """How the module is cut into matrices, checked against its shape (ValueError if it does not fit)."""
        entry = self.modules[module]
        if entry.split is None:
            return None
        split = Split.from_json(entry.split)
        split.check(entry.shape)
        return split

    def _decoder(self, module: str) -> Operator:
        entry = self.modules[module]
        return decoder_for(entry.operator, entry.operator_version, provenance=self.manifest.provenance(entry.operator),
                           where=f"pack {self.name!r} module {module}")

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Float32 factors (B, A) whose product is the module's delta as a matrix (its first
        dimension by the rest), from a low-rank operator; None when the operator has none (its
        delta is not stored low-rank) or the module is split into parts.

        Raises:
            PackError: The factors do not fit the module's shape or are not finite.
        """
        entry, where = self.modules[module], f"pack {self.name!r} module {module}"
        operator = self._decoder(module)
        if entry.split is not None or not hasattr(operator, "factors") or len(entry.shape) < 2:
            return None
        try:
            b, a = operator.factors(self.fields(module), entry.meta, self._params(module, operator), entry.shape,
                                    version=entry.operator_version)
        except (ValueError, KeyError, IndexError, TypeError, RuntimeError) as exc:
            raise PackError(f"{where} has no usable factors: {exc}"[:300]) from exc
        rows, cols = entry.shape[0], math.prod(entry.shape[1:])
        if b.dim() != 2 or a.dim() != 2 or b.shape[0] != rows or a.shape[1] != cols or b.shape[1] != a.shape[0]:
            raise PackError(f"{where}: factors {list(b.shape)} x {list(a.shape)} do not make a {rows} x {cols} delta")
        if not bool(torch.isfinite(b.sum() + a.sum())):
            raise PackError(f"{where} has NaN or Inf factors: the pack is damaged; refusing to use it")
        return b, a

    def decode(self, module: str) -> torch.Tensor:
        """The float32 delta of one module, decoded by the operator that encoded it.

        The result is checked: it has the module's shape and holds only finite numbers, so a
        damaged or hostile pack can never put NaN or Inf into a model.

        Raises:
            OperatorError: The operator is not installed, or its installed version cannot decode this
                pack; the message names the operator, the version and the distribution to install.
            PackError: The stored data does not decode to a finite delta of the module's shape.
        """
        entry, where = self.modules[module], f"pack {self.name!r} module {module}"
        operator = self._decoder(module)
        try:
            delta = decode_split(operator, self.fields(module), entry.meta, self._params(module, operator),
                                 entry.shape, self._split(module), version=entry.operator_version)
        except (ValueError, KeyError, IndexError, TypeError, RuntimeError) as exc:
            raise PackError(f"{where} cannot be decoded by operator {operator.name}: {exc}"[:300]) from exc
        if tuple(delta.shape) != entry.shape:
            raise PackError(f"{where} decodes to shape {list(delta.shape)}, the manifest says {list(entry.shape)}")
        # One reduction in the common case; the element-wise test only when the sum is not finite.
        if not bool(torch.isfinite(delta.sum())) and not bool(torch.isfinite(delta).all()):
            raise PackError(f"{where} decodes to NaN or Inf values: the pack is damaged; refusing to use it")
        return delta


def load_pack(path: str | os.PathLike[str], *, verify: bool = True,
              checked_manifest: dict[str, Any] | None = None) -> SkillPack:
    """Open a SkillPack directory.

    Args:
        path: The pack directory.
        verify: Also check every file's sha256 against the manifest (reads the whole pack
            once). Sizes, and the embedded manifest and tensor list against skillpack.json, are
            always checked (they need only the headers).
        checked_manifest: The manifest the caller has just validated and written to ``path``
            (spares reading and validating it again).

    Raises:
        PackError: The pack is missing, fails its schema, or is corrupt.
    """
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if checked_manifest is not None:
        manifest = Manifest(checked_manifest)
    else:
        if not manifest_path.exists():
            raise PackError(f"{path} is not a SkillPack: {MANIFEST_FILE} not found")
        manifest = Manifest(read_json(manifest_path, error=PackError, expect=dict))
        validate_manifest(manifest, what=str(manifest_path))
    for name, expected in manifest.files.items():
        file_path = path / name
        if not file_path.exists():
            raise PackError(f"{path}: file {name} named in the manifest is missing")
        if not file_path.is_file():
            raise PackError(f"{file_path} is not a regular file")
        if file_path.stat().st_size != expected["bytes"]:
            raise PackError(f"{file_path} has {file_path.stat().st_size} bytes, the manifest says {expected['bytes']}")
        if verify and sha256_file(file_path) != expected["sha256"]:
            raise PackError(f"{file_path} does not match its sha256 in the manifest: the pack is corrupt")
    try:
        tensors = TensorFile(path / TENSORS_FILE)
    except SkillhubError as exc:
        raise PackError(str(exc)) from exc
    pack = SkillPack(path, manifest, tensors)
    _check_consistent(pack, tensors)
    return pack


def _check_consistent(pack: SkillPack, tensors: TensorFile) -> None:
    path = pack.path
    embedded = parse_json(tensors.metadata.get(METADATA_KEY, "null"), what=f"the manifest embedded in {path}/{TENSORS_FILE}",
                          error=PackError)
    if embedded != embedded_part(pack.manifest):
        raise PackError(f"{path}: {MANIFEST_FILE} disagrees with the manifest embedded in {TENSORS_FILE}")
    expected = {f"{m}/{f}" for m, entry in pack.modules.items() for f in entry.fields}
    if expected != set(tensors.keys()):
        raise PackError(f"{path}: the tensors in {TENSORS_FILE} do not match the modules of the manifest")
    for module, entry in pack.modules.items():
        stored = sum(tensors.nbytes(f"{module}/{f}") for f in entry.fields)
        if stored != entry.stored_bytes:
            raise PackError(f"{path}: module {module} stores {stored} bytes, the manifest says {entry.stored_bytes}")

