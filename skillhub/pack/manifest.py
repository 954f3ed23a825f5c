"""The SkillPack manifest (``skillpack.json``): its types, schema validation, and the parts
derived from it.

A :class:`Manifest` is the JSON document itself (a ``dict``: written, embedded and shown as
is, and ``pack.manifest["totals"]`` keeps working for scripts) with typed accessors, so that
no module indexes raw keys: ``manifest.base.fingerprint``, ``manifest.modules()[name].shape``,
``manifest.tensors_sha256``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from skillhub.errors import PackError, SkillhubError

if TYPE_CHECKING:
    from skillhub.io.checkpoint import Checkpoint

FORMAT_VERSION = 1
# The files of a pack directory (see skillhub.pack.format). Kept here, away from torch, so that
# registry listings can name them without loading the tensor machinery.
MANIFEST_FILE = "skillpack.json"
TENSORS_FILE = "skillpack.safetensors"
CARD_FILE = "README.md"
# Keys of skillpack.json that are not embedded in skillpack.safetensors: the file hashes
# (a file cannot hold its own hash) and the provenance a pull adds afterwards.
DETACHED_KEYS = ("files", "source")


@dataclass(frozen=True)
class ModuleEntry:
    """How one parameter's delta is stored (``modules.<parameter>`` of the manifest)."""

    role: str
    operator: str
    operator_version: str
    params: dict[str, Any]
    meta: dict[str, Any]
    shape: tuple[int, ...]
    dtype: str
    fields: tuple[str, ...]
    stored_bytes: int
    delta_fp16_bytes: int
    error: float
    split: dict[str, Any] | None = None  # stored as the matrices it is made of (skillhub.operators.parts)

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> ModuleEntry:
        return cls(role=entry["role"], operator=entry["operator"], operator_version=entry["operator_version"],
                   params=entry["params"], meta=entry["meta"], shape=tuple(entry["shape"]), dtype=entry["dtype"],
                   fields=tuple(entry["fields"]), stored_bytes=entry["stored_bytes"],
                   delta_fp16_bytes=entry["delta_fp16_bytes"], error=entry["error"], split=entry.get("split"))


@dataclass(frozen=True)
class BaseRef:
    """The base model a pack was made for (``base`` of the manifest)."""

    id: str
    revision: str | None
    architecture: str | None
    model_type: str | None
    fingerprint: str
    dtype: str
    tie_word_embeddings: bool | None = None

    @classmethod
    def of(cls, checkpoint: Checkpoint) -> BaseRef:
        """The checkpoint as a base model (one full read of its weights, for the fingerprint)."""
        from skillhub.io.checkpoint import fingerprint

        return cls(id=checkpoint.ref.id, revision=checkpoint.ref.revision, architecture=checkpoint.architecture,
                   model_type=checkpoint.model_type, fingerprint=fingerprint(checkpoint),
                   dtype=checkpoint.dominant_dtype(), tie_word_embeddings=checkpoint.tie_word_embeddings)


class Manifest(dict):
    """A validated ``skillpack.json`` (or the one being built): the document, with typed accessors."""

    @property
    def name(self) -> str:
        return self["name"]

    @property
    def task(self) -> str:
        return self["task"]

    @property
    def version(self) -> str:
        return self["version"]

    @property
    def base(self) -> BaseRef:
        return BaseRef(**self["base"])

    @property
    def parent_sha256(self) -> str | None:
        """The store address of the pack this one was trained on top of, if any."""
        return self["parent"]["sha256"] if self.get("parent") else None

    def modules(self) -> dict[str, ModuleEntry]:
        """Every module's entry, by parameter name."""
        return {name: ModuleEntry.from_dict(entry) for name, entry in self["modules"].items()}

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        """``{file name: {"bytes", "sha256"}}`` of every file but skillpack.json."""
        return self.get("files", {})

    @property
    def tensors_sha256(self) -> str:
        """sha256 of skillpack.safetensors: the pack's address in a store."""
        return self["files"][TENSORS_FILE]["sha256"]

    @property
    def stored_bytes(self) -> int:
        return self["totals"]["stored_bytes"]

    @property
    def ratio(self) -> float:
        return self["totals"]["ratio"]

    def provenance(self, operator: str) -> dict[str, str] | None:
        """Which distribution provided ``operator`` when the pack was written."""
        return self.get("operators", {}).get(operator)


def validate_manifest(document: Any, *, what: str, embedded: bool = False) -> None:
    """Check ``document`` against ``schemas/skillpack.schema.json``.

    Args:
        document: The parsed manifest.
        what: How to name it in messages.
        embedded: It is the copy embedded in skillpack.safetensors, which has no ``files``;
            a skillpack.json must list its files (only those are ever opened).

    Raises:
        PackError: Naming the first offending field.
    """
    from skillhub.pack.schemas import validate  # jsonschema: only where a manifest is validated

    validate(document, "skillpack", error=PackError, what=what)
    if not embedded and "files" not in document:
        raise PackError(f"{what} lists no files: a pack's skillpack.json must name its files with their sha256")


def embedded_part(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest as embedded in the safetensors metadata (everything but DETACHED_KEYS)."""
    return {key: value for key, value in manifest.items() if key not in DETACHED_KEYS}


def totals(modules: dict[str, dict[str, Any]], *, parameters: int, delta_fp16_bytes: int,
           squared_error: float, squared_norm: float) -> dict[str, Any]:
    """The ``totals`` section from per-module entries and whole-delta statistics."""
    stored = sum(entry["stored_bytes"] for entry in modules.values())
    return {
        "parameters": parameters,
        "modules": len(modules),
        "delta_fp16_bytes": delta_fp16_bytes,
        "stored_bytes": stored,
        "ratio": stored / delta_fp16_bytes if delta_fp16_bytes else 0.0,
        "relative_error": (squared_error / squared_norm) ** 0.5 if squared_norm else 0.0,
    }


def check_pack_identity(*, name: str, task: str, version: str) -> None:
    """Check a pack's name, task and version before any work.

    Raises:
        SkillhubError: Naming the bad value and the allowed form.
    """
    from skillhub.pack.names import check_name
    from skillhub.pack.schemas import load_schema

    check_name(name, "pack")
    check_name(task, "task")
    if not re.fullmatch(load_schema("skillpack")["properties"]["version"]["pattern"], version):
        raise SkillhubError(f"pack version {version!r} is not allowed: use a version like 1.0.0")
