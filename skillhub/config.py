"""Environment variables and default paths, read at call time so tests only set env vars."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def debug() -> bool:
    """SKILLHUB_DEBUG=1 makes the CLI show tracebacks of skillhub errors."""
    return os.environ.get("SKILLHUB_DEBUG", "") not in ("", "0", "false", "no")


def home() -> Path:
    """The registry home: $SKILLHUB_HOME, else the platform user data directory."""
    configured = os.environ.get("SKILLHUB_HOME")
    return Path(configured) if configured else Path(platformdirs.user_data_dir("skillhub"))


def default_device() -> str:
    """Device used for compression maths unless --device says otherwise ($SKILLHUB_DEVICE, else cpu)."""
    return os.environ.get("SKILLHUB_DEVICE", "cpu")


def stream_above_bytes() -> int:
    """Deltas larger than this in float32 ($SKILLHUB_STREAM_ABOVE_MIB, default 256 MiB) are encoded a
    row block at a time by operators that can (``magnitude-prune``): a 128k-vocabulary embedding at
    8B width is 2 GB whole."""
    configured = os.environ.get("SKILLHUB_STREAM_ABOVE_MIB", "").strip()
    if not configured:
        return 256 << 20
    try:
        value = float(configured)
    except ValueError:
        value = -1.0
    if not value >= 0:
        from skillhub.errors import SkillhubError

        raise SkillhubError(f"SKILLHUB_STREAM_ABOVE_MIB={configured!r} is not a number of MiB >= 0")
    return int(value * (1 << 20))


DEFAULT_MAX_LINEAGE_PACKS = 1000


def max_lineage_packs() -> int:
    """Most packs a pulled lineage may list ($SKILLHUB_MAX_LINEAGE_PACKS, default 1000)."""
    configured = os.environ.get("SKILLHUB_MAX_LINEAGE_PACKS", "").strip()
    if not configured:
        return DEFAULT_MAX_LINEAGE_PACKS
    if not configured.isdigit() or int(configured) < 1:
        from skillhub.errors import SkillhubError

        raise SkillhubError(f"SKILLHUB_MAX_LINEAGE_PACKS={configured!r} is not a positive whole number")
    return int(configured)


def plugin_allowlist() -> tuple[str, ...] | None:
    """SKILLHUB_LOAD_PLUGINS: which plugin operators to load, as comma-separated distribution or
    operator names. Unset loads every installed plugin; set but empty loads built-ins only."""
    configured = os.environ.get("SKILLHUB_LOAD_PLUGINS")
    if configured is None:
        return None
    return tuple(sorted({item.strip() for item in configured.split(",") if item.strip()}))
