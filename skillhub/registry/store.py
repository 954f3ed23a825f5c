"""Content-addressed pack storage: each pack's files under ``<root>/<sha[:2]>/<sha>/``.

The address is the sha256 of the pack's ``skillpack.safetensors`` (recorded in its manifest).
A pack is copied into a temporary directory under ``<root>/.incoming`` and renamed into place,
so a crash leaves either the whole pack or an incoming leftover that ``doctor`` removes.

The store marks what it owns, so that repairs never touch anything else that shares the
directory: its root holds :data:`STORE_MARKER` (written with the first pack), entries are
exactly ``<2 hex>/<64 hex>`` directories holding only pack files, and incoming directories
are ``.incoming/<label>-<8 hex>``. Only the files a manifest names are stored, read without
following symbolic links.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from skillhub.errors import PackError, SkillhubError
from skillhub.pack.manifest import CARD_FILE, MANIFEST_FILE, TENSORS_FILE
from skillhub.io.jsonio import open_regular
from skillhub.io.outputs import describe_os_error

if TYPE_CHECKING:
    from skillhub.pack.format import SkillPack

INCOMING = ".incoming"
STORE_MARKER = ".skillhub-store"
PACK_FILES = frozenset({MANIFEST_FILE, TENSORS_FILE, CARD_FILE})
_ADDRESS = re.compile(r"[0-9a-f]{64}")
_PREFIX = re.compile(r"[0-9a-f]{2}")
_INCOMING_ENTRY = re.compile(r"[A-Za-z0-9_-]{1,64}-[0-9a-f]{8}")


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
            self._mark()
            directory.mkdir(parents=True)
        except OSError as exc:
            raise SkillhubError(describe_os_error(exc, f"the store {self.root}")) from exc
        return directory

    @property
    def marked(self) -> bool:
        """Whether the root carries the store marker (skillhub has written packs here)."""
        marker = self.root / STORE_MARKER
        return marker.is_file() and not marker.is_symlink()

    def _mark(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.marked:
            (self.root / STORE_MARKER).write_text("skillhub pack store: <sha[:2]>/<sha256>/ pack directories\n",
                                                  encoding="utf-8")

    def put(self, pack: SkillPack, *, adopt: bool = False) -> str:
        """Store a verified pack (idempotent) and return its address.

        Args:
            pack: The pack (already verified, e.g. opened with ``load_pack``).
            adopt: ``pack.path`` is a directory from :meth:`incoming`: move it into place
                instead of copying and re-verifying it.

        Raises:
            SkillhubError: The store is not writable.
        """
        from skillhub.pack.format import load_pack

        sha256 = pack.manifest.tensors_sha256
        final = self.path(sha256)
        if final.is_dir():
            load_pack(final)  # an earlier copy must still be intact to be reused
            return sha256
        incoming = pack.path if adopt else self.root / INCOMING / f"{sha256[:12]}-{uuid.uuid4().hex[:8]}"
        names = sorted({MANIFEST_FILE, *pack.manifest.files})
        try:
            self._mark()
            if not adopt:
                incoming.mkdir(parents=True)
            for name in names:
                if not adopt:
                    _copy_regular(pack.path / name, incoming / name)
                with open(incoming / name, "rb") as handle:
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
            raise SkillhubError(describe_os_error(exc, f"the store {self.root}")) from exc
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
        return sha256

    def open(self, sha256: str, *, verify: bool = True) -> SkillPack:
        """The stored pack.

        Raises:
            PackError: Missing from the store, or corrupt.
        """
        from skillhub.pack.format import load_pack

        path = self.path(sha256)
        if not path.is_dir():
            raise PackError(f"pack {sha256[:12]} is missing from the store {self.root}; run `skillhub doctor`")
        return load_pack(path, verify=verify)

    def delete(self, sha256: str) -> None:
        """Remove a stored pack (no error if absent)."""
        shutil.rmtree(self.path(sha256), ignore_errors=True)

    def addresses(self) -> Iterator[str]:
        """Every stored address: ``<2 hex>/<64 hex>`` directories under a marked root, nothing else."""
        if not self.marked:
            return
        for prefix in sorted(self.root.iterdir()):
            if _PREFIX.fullmatch(prefix.name) and _real_dir(prefix):
                for entry in sorted(prefix.iterdir()):
                    if _ADDRESS.fullmatch(entry.name) and entry.name.startswith(prefix.name) and _real_dir(entry):
                        yield entry.name

    def owns(self, sha256: str) -> bool:
        """Whether the entry at ``sha256`` provably is a pack this store wrote: a well-formed address
        in a marked store, holding nothing but pack files."""
        path = self.path(sha256)
        if not (self.marked and _ADDRESS.fullmatch(sha256) and _real_dir(path)):
            return False
        entries = list(path.iterdir())
        return (MANIFEST_FILE in {e.name for e in entries}
                and all(e.name in PACK_FILES and _regular(e) for e in entries))

    def leftovers(self) -> list[Path]:
        """Incoming directories left by interrupted writes (``.incoming/<label>-<8 hex>`` only)."""
        incoming = self.root / INCOMING
        if not self.marked or not _real_dir(incoming):
            return []
        return sorted(e for e in incoming.iterdir() if _INCOMING_ENTRY.fullmatch(e.name) and _real_dir(e))


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _regular(path: Path) -> bool:
    return stat.S_ISREG(path.lstat().st_mode)


def _copy_regular(source: Path, destination: Path) -> None:
    """Copy one pack file; the source must be a regular file, never followed through a link."""
    if source.is_symlink():
        raise PackError(f"{source} is a symbolic link; skillhub stores only regular files: copy the pack "
                        "with its files (cp -rL) and add the copy")
    # O_NOFOLLOW as well: a link swapped in after the check above is still not followed.
    with open_regular(source, what=str(source), error=PackError, follow_symlinks=False) as reader, \
            open(destination, "xb") as writer:
        shutil.copyfileobj(reader, writer, 16 * 1024 * 1024)
