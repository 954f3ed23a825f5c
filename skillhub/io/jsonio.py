"""Reading JSON that came from outside (files, headers, the Hub) with bounds.

Python's parser recurses once per nesting level, so a document nested thousands deep
raises RecursionError, and a multi-GB "manifest" would be read whole into memory. Every
JSON document skillhub did not just write itself goes through here: a size limit, regular
files only (a FIFO would block forever), a nesting limit, and one error class per caller.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from skillhub.errors import SkillhubError

MAX_DEPTH = 64
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024  # a manifest of a 70B MoE model is a few MB
MAX_TEXT_BYTES = 4 * 1024**3  # eval and calibration files, read whole


_KINDS = {dict: "an object", list: "an array", str: "a string", bool: "true or false", type(None): "null",
          int: "a number", float: "a number"}


def parse_json(data: str | bytes, *, what: str, error: type[SkillhubError] = SkillhubError,
               expect: type | None = None) -> Any:
    """Parse ``data``; raises ``error`` naming ``what`` for invalid or too deeply nested JSON, or (with
    ``expect``, e.g. ``dict``) for a document of another shape."""
    try:
        document = json.loads(data)
    except RecursionError as exc:
        raise error(f"{what} is nested too deeply to be a skillhub document") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise error(f"{what} is not valid JSON: {exc}") from exc
    if _depth(document) > MAX_DEPTH:
        raise error(f"{what} is nested more than {MAX_DEPTH} levels deep")
    if expect is not None and not isinstance(document, expect):
        raise error(f"{what} must be a JSON {_KINDS[expect][3:] if expect is dict else _KINDS[expect]}, "
                    f"not {_KINDS.get(type(document), type(document).__name__)}")
    return document


def open_regular(path: str | os.PathLike[str], *, what: str, error: type[SkillhubError] = SkillhubError,
                 follow_symlinks: bool = True) -> BinaryIO:
    """Open a file for reading only if it is a regular file (opening never blocks: a FIFO or a
    device is refused, not waited on); with ``follow_symlinks=False`` a link is not followed.

    Raises:
        ``error``: It cannot be opened, or is not a regular file.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise error(f"cannot read {what}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # checked on the descriptor: a directory cannot become a file object
        kind = "a directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "not a regular file"
        os.close(fd)
        raise error(f"{what} is {kind}: give a file" if kind == "a directory" else f"{what} is not a regular file")
    return os.fdopen(fd, "rb")


def read_regular(path: str | os.PathLike[str], *, what: str, error: type[SkillhubError] = SkillhubError,
                 max_bytes: int = MAX_DOCUMENT_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; anything else raises ``error``."""
    with open_regular(path, what=what, error=error) as handle:
        info = os.fstat(handle.fileno())
        if info.st_size > max_bytes:
            raise error(f"{what} has {info.st_size:,} bytes, more than the {max_bytes:,} allowed")
        return handle.read(max_bytes + 1)[:max_bytes]


def read_json(path: str | os.PathLike[str], *, what: str | None = None, error: type[SkillhubError] = SkillhubError,
              max_bytes: int = MAX_DOCUMENT_BYTES, expect: type | None = None) -> Any:
    """Parse a JSON file with :func:`read_regular`'s and :func:`parse_json`'s checks (``expect``: its shape)."""
    what = what or str(Path(path))
    return parse_json(read_regular(path, what=what, error=error, max_bytes=max_bytes), what=what, error=error,
                      expect=expect)


def _depth(document: Any) -> int:
    deepest, stack = 0, [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_DEPTH:
                return depth
            stack.extend((child, depth + 1) for child in (value.values() if isinstance(value, dict) else value))
    return deepest


def write_atomically(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` under a temporary name, then rename: a reader (or a rerun after
    a kill) sees the old file or the whole new one, never a half-written one."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(staging, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)
    return path


def write_json_lines(path: str | os.PathLike[str], records: list[Any]) -> Path:
    """One JSON document per line, written atomically (see :func:`write_atomically`)."""
    return write_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_json_lines(path: str | os.PathLike[str], *, what: str) -> list[Any]:
    """The documents of a JSON-lines file skillhub wrote (:func:`write_json_lines`)."""
    text = read_regular(path, what=what, max_bytes=MAX_TEXT_BYTES).decode("utf-8")
    return [parse_json(line, what=f"{what} line {n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]
