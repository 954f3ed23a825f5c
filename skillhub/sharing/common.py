"""What push and pull share: repo ids and references, folders inside a repo, the lineage
document's name, and reading a small JSON document from a repo with bounds."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from skillhub.errors import PackError, SkillhubError
from skillhub.io.jsonio import MAX_DOCUMENT_BYTES, parse_json

if TYPE_CHECKING:
    from skillhub.io.hub import Snapshot

LINEAGE_FILE = "lineage.json"
TAG_PREFIX = "v"
MAX_MANIFEST_BYTES = MAX_DOCUMENT_BYTES  # skillpack.json as served by a repo
MAX_LINEAGE_BYTES = 4 * 1024 * 1024  # lineage.json: about 300 bytes a pack
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def parse_reference(reference: str) -> tuple[str, str | None]:
    """``OWNER/NAME[@REV]`` -> (repo id, revision or None).

    Raises:
        SkillhubError: It is not of that form.
    """
    repo_id, at, revision = reference.partition("@")
    check_repo_id(repo_id)
    if at and not revision:
        raise SkillhubError(f"{reference!r} names no revision after '@': write OWNER/NAME@BRANCH, @TAG or @COMMIT")
    return repo_id, revision or None


def check_repo_id(repo_id: str) -> None:
    """Refuse anything but ``OWNER/NAME``."""
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise SkillhubError(f"{repo_id!r} is not a Hub repo id: write OWNER/NAME (letters, digits, '.', '_', '-')")


def folder_in_repo(path: str | None) -> str:
    """A folder inside a repo given by the user, normalised; '' for the root."""
    if not path:
        return ""
    parts = PurePosixPath(path.strip("/")).parts
    if any(part in ("..", ".") for part in parts) or "\\" in path:
        raise SkillhubError(f"--path {path!r} must be a folder inside the repo, without '..'")
    return "/".join(parts)


def join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def remote_json(at: Snapshot, filename: str, scratch: Path, *, max_bytes: int) -> dict[str, Any]:
    from skillhub.io import hub

    local = scratch / f"document-{len(list(scratch.iterdir()))}.json"
    what = f"{at.repo_id}@{at.revision}/{filename}"
    return parse_json(hub.read_bytes(at, filename, local, max_bytes=max_bytes), what=what, error=PackError,
                      expect=dict)


def remote_manifest(at: Snapshot, filename: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="skillhub-") as scratch:
        return remote_json(at, filename, Path(scratch), max_bytes=MAX_MANIFEST_BYTES)


