"""Where skillhub may write: the one guard every command that takes ``-o`` goes through.

Rules, checked before any work (:func:`check_output`) and again when writing starts:

- An output is never, contains, or lies inside a protected path: the command's inputs
  (models, packs), the registry home and store, and it never is or contains the current
  directory.
- An existing output is replaced only with ``force`` and only if skillhub wrote it: a
  directory holding :data:`MARKER_FILE` (written into every output) or a pack's
  ``skillpack.json``. Files, symlinks and foreign directories are refused even with ``force``.
- Outputs are built in a hidden sibling (``.NAME.tmp-XXXXXXXX``) and renamed into place.
  While that runs, a journal entry under ``<home>/writes/`` names the sibling, so that a
  killed process leaves a leftover ``skillhub doctor`` can prove is its own and remove.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from skillhub import config
from skillhub.errors import OutputConflictError, OutputExistsError, SkillhubError

MARKER_FILE = ".skillhub-output.json"
PACK_MANIFEST = "skillpack.json"  # a pack directory is skillhub's even without a marker (older packs)
JOURNAL_DIR = "writes"

_log = logging.getLogger(__name__)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def describe_os_error(exc: OSError, writing: str | os.PathLike[str]) -> str:
    """A one-line account of a failed write; a full disk is called a full disk."""
    if exc.errno in _DISK_FULL:
        return (f"the disk is full: no space left on the device holding {writing} "
                f"({exc.strerror}); nothing was written there: free space or choose another place")
    if exc.errno == errno.EFBIG:
        return (f"a file grew past the size this system allows while writing {writing} ({exc.strerror}); "
                "nothing was written there")
    where = f" ({exc.filename})" if exc.filename else ""
    return f"cannot write {writing}: {exc.strerror or exc}{where}"


def _resolved(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(os.path.expanduser(path))).resolve()


def _nested(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _marker(path: Path) -> dict | None:
    """The marker of a real directory: None if it has none, {} if it cannot be read."""
    marker = path / MARKER_FILE
    if path.is_symlink() or not path.is_dir() or marker.is_symlink() or not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def written_by_skillhub(path: Path) -> bool:
    """Whether ``path`` is a directory skillhub wrote (its marker, or a pack manifest)."""
    marker = _marker(path)
    if marker is not None:
        return marker.get("written_by") == "skillhub"
    return not path.is_symlink() and path.is_dir() and (path / PACK_MANIFEST).is_file()


def check_output(output: str | os.PathLike[str], *, force: bool = False,
                 protect: Iterable[str | os.PathLike[str] | None] = ()) -> Path:
    """Check that ``output`` may be written (see the module docstring).

    Args:
        output: The directory the command will create or replace.
        force: The user allows replacing an existing output that skillhub wrote.
        protect: Paths the output must stay clear of (inputs, registry, store); None is skipped.

    Returns:
        ``output`` as a path.

    Raises:
        OutputConflictError: It overlaps a protected path, or exists and is not skillhub's.
        OutputExistsError: It exists and ``force`` was not given.
    """
    output = Path(output)
    target = _resolved(output)
    cwd = _resolved(Path.cwd())
    if target == cwd or target in cwd.parents:
        raise OutputConflictError(output, f"output {output} is or contains the current directory; choose a new directory")
    guarded = [(p, _resolved(p)) for p in (*protect, config.home()) if p is not None]
    for given, path in guarded:
        if _nested(target, path):
            relation = "is" if target == path else ("lies inside" if path in target.parents else "contains")
            raise OutputConflictError(
                output, f"output {output} {relation} {given}, which this command reads or skillhub keeps: choose another -o"
            )
    if output.is_symlink():
        raise OutputConflictError(output, f"output {output} is a symbolic link; skillhub writes only real directories")
    if output.exists():
        if not force:
            raise OutputExistsError(output)
        if not written_by_skillhub(output):
            raise OutputConflictError(
                output, f"{output} exists and was not written by skillhub (no {MARKER_FILE} or {PACK_MANIFEST}); "
                "--force replaces only skillhub's own outputs: choose another path"
            )
    return output


@contextmanager
def staged_directory(output: str | os.PathLike[str], *, force: bool = False,
                     protect: Iterable[str | os.PathLike[str] | None] = (), kind: str = "output") -> Iterator[Path]:
    """A marked temporary sibling directory that replaces ``output`` only if the block succeeds.

    Raises:
        OutputExistsError: See :func:`check_output` (checked before any work).
        SkillhubError: The directory cannot be written (a full disk is named as such).
    """
    output = check_output(output, force=force, protect=protect)
    token = uuid.uuid4().hex[:8]
    staging = output.parent / f".{output.name}.tmp-{token}"
    retired = output.parent / f".{output.name}.old-{token}"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        _write_marker(staging, kind, token)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise SkillhubError(describe_os_error(exc, output)) from exc
    journal = _journal(token, staging, retired, output)
    try:
        yield staging
        if output.exists():
            # Directories cannot be swapped atomically: move the old one aside first so that
            # at every instant one complete version exists.
            output.rename(retired)
            staging.rename(output)
            shutil.rmtree(retired, ignore_errors=True)  # if this fails, the journal keeps it for doctor
        else:
            staging.rename(output)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise SkillhubError(describe_os_error(exc, output)) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if journal is not None and not staging.exists() and not retired.exists():
            journal.unlink(missing_ok=True)


def replace_directory(output: str | os.PathLike[str], *, protect: Iterable[str | os.PathLike[str] | None] = (),
                      kind: str = "output") -> Path:
    """Empty ``output`` for a run that must build in place (it records its own absolute paths, as
    the demo's registry does), replacing only an earlier output of skillhub (same rules as
    :func:`check_output` with ``force``), and mark it."""
    output = check_output(output, force=True, protect=protect)
    try:
        if output.exists():
            shutil.rmtree(output)
        output.mkdir(parents=True)
        _write_marker(output, kind, uuid.uuid4().hex[:8])
    except OSError as exc:
        raise SkillhubError(describe_os_error(exc, output)) from exc
    return output


def _write_marker(directory: Path, kind: str, token: str) -> None:
    from skillhub import __version__

    record = {"written_by": "skillhub", "skillhub_version": __version__, "kind": kind, "token": token}
    (directory / MARKER_FILE).write_text(json.dumps(record) + "\n", encoding="utf-8")


def _journal(token: str, staging: Path, retired: Path, output: Path) -> Path | None:
    """Record an output being built, so that ``doctor`` can find what a killed process left."""
    directory = config.home() / JOURNAL_DIR
    entry = directory / f"{token}.json"
    record = {"token": token, "staging": str(_resolved(staging)), "retired": str(_resolved(retired)),
              "output": str(_resolved(output)), "pid": os.getpid(), "host": socket.gethostname()}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        temporary = directory / f".{token}.tmp"
        temporary.write_text(json.dumps(record), encoding="utf-8")
        temporary.replace(entry)
    except OSError as exc:  # the output itself is still safe; only doctor's cleanup hint is lost
        _log.warning("cannot record the output in %s (%s): doctor will not find it if this is killed",
                     directory, exc.strerror or exc)
        return None
    return entry


def interrupted_writes() -> list[dict[str, str]]:
    """Outputs whose writer died mid-way: journal entries of dead processes on this host, with
    the leftover directories that provably are theirs (marker with the same token)."""
    directory = config.home() / JOURNAL_DIR
    if not directory.is_dir():
        return []
    found = []
    for entry in sorted(directory.glob("*.json")):
        try:
            record = json.loads(entry.read_text(encoding="utf-8"))
            token, pid, host = str(record["token"]), int(record["pid"]), str(record["host"])
            paths = (Path(record["staging"]), Path(record["retired"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if host != socket.gethostname() or _alive(pid) or entry.stem != token:
            continue
        staging, retired = paths
        leftovers = [str(p) for p, ours in ((staging, _marked_with(staging, token)),
                                            (retired, written_by_skillhub(retired))) if ours]
        found.append({"journal": str(entry), "output": str(record.get("output")), "leftovers": leftovers})
    return found


def remove_interrupted(write: dict[str, str]) -> list[str]:
    """Delete what :func:`interrupted_writes` found for one write; returns what was removed."""
    removed = []
    for leftover in write["leftovers"]:
        shutil.rmtree(leftover)
        removed.append(leftover)
    Path(write["journal"]).unlink(missing_ok=True)
    return removed


def _marked_with(path: Path, token: str) -> bool:
    return (_marker(path) or {}).get("token") == token


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
