"""The SkillPack manifest (``skillpack.json``): schema validation and the parts derived from it."""

from __future__ import annotations

import re
from typing import Any

from skillhub.errors import PackError, SkillhubError

FORMAT_VERSION = 1
# The files of a pack directory (see skillhub.pack.format). Kept here, away from torch, so that
# registry listings can name them without loading the tensor machinery.
MANIFEST_FILE = "skillpack.json"
TENSORS_FILE = "skillpack.safetensors"
CARD_FILE = "README.md"
# Keys of skillpack.json that are not embedded in skillpack.safetensors: the file hashes
# (a file cannot hold its own hash) and the provenance a pull adds afterwards.
DETACHED_KEYS = ("files", "source")


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
