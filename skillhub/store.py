"""Content-addressed pack storage: each pack's files under ``<root>/<sha[:2]>/<sha>/``.

The address is the sha256 of the pack's ``skillpack.safetensors`` (recorded in its manifest).
A pack is copied into a temporary directory under ``<root>/.incoming`` and renamed into place,
so a crash leaves either the whole pack or an incoming leftover that ``doctor`` removes.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from skillhub.errors import SkillhubError
from skillhub.manifest import TENSORS_FILE

if TYPE_CHECKING:
    from skillhub.pack import SkillPack

INCOMING = ".incoming"


class PackStore:
    """A directory of packs keyed by sha256."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        """Where the pack with this address lives (whether or not it exists)."""
        return self.root / sha256[:2] / sha256

    def incoming(self, label: str) -> Path:
        """A new private directory under the store's incoming area, for a pack being written
        (e.g. downloaded); ``doctor --repair`` removes it if the writer dies."""
        directory = self.root / INCOMING / f"{label}-{uuid.uuid4().hex[:8]}"
        try:
            directory.mkdir(parents=True)
        except OSError as exc:
            raise SkillhubError(f"cannot write to the store {self.root}: {exc.strerror or exc}") from exc
        return directory

    def put(self, pack: SkillPack, *, adopt: bool = False) -> str:
        """Store a verified pack (idempotent) and return its address.

        Args:
            pack: The pack (already verified, e.g. opened with ``load_pack``).
            adopt: ``pack.path`` is a directory from :meth:`incoming`: move it into place
                instead of copying and re-verifying it.

        Raises:
            SkillhubError: The store is not writable.
        """
        from skillhub.pack import load_pack

        sha256 = pack.manifest["files"][TENSORS_FILE]["sha256"]
        final = self.path(sha256)
        if final.is_dir():
            load_pack(final)  # an earlier copy must still be intact to be reused
            return sha256
        incoming = pack.path if adopt else self.root / INCOMING / f"{sha256[:12]}-{uuid.uuid4().hex[:8]}"
        try:
            if not adopt:
                incoming.mkdir(parents=True)
            for source in sorted(pack.path.iterdir()):
                if source.is_file():
                    if not adopt:
                        shutil.copyfile(source, incoming / source.name)
                    with open(incoming / source.name, "rb") as handle:
                        os.fsync(handle.fileno())
            if not adopt:
                load_pack(incoming)  # the copy is what gets stored: check it
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                incoming.rename(final)
            except OSError:
                if not final.is_dir():  # another process stored the same pack first: fine
                    raise
        except OSError as exc:
            raise SkillhubError(f"cannot write pack to the store {self.root}: {exc.strerror or exc}") from exc
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
        return sha256

    def open(self, sha256: str, *, verify: bool = True) -> SkillPack:
        """The stored pack.

        Raises:
            PackError: Missing from the store, or corrupt.
        """
        from skillhub.errors import PackError
        from skillhub.pack import load_pack

        path = self.path(sha256)
        if not path.is_dir():
            raise PackError(f"pack {sha256[:12]} is missing from the store {self.root}; run `skillhub doctor`")
        return load_pack(path, verify=verify)

    def delete(self, sha256: str) -> None:
        """Remove a stored pack (no error if absent)."""
        shutil.rmtree(self.path(sha256), ignore_errors=True)

    def addresses(self) -> Iterator[str]:
        """Every stored address."""
        if not self.root.is_dir():
            return
        for prefix in sorted(self.root.iterdir()):
            if prefix.is_dir() and len(prefix.name) == 2:
                for entry in sorted(prefix.iterdir()):
                    if entry.is_dir():
                        yield entry.name

    def leftovers(self) -> list[Path]:
        """Incoming directories left by interrupted writes."""
        incoming = self.root / INCOMING
        return sorted(incoming.iterdir()) if incoming.is_dir() else []
