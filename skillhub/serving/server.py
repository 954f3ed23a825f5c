"""Running the app: uvicorn on a host and port, refusing to expose it without an API key."""

from __future__ import annotations

import ipaddress

from skillhub.errors import SkillhubError


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(host: str, api_key: str | None) -> None:
    """Raises SkillhubError if ``host`` is not loopback and no API key protects the server."""
    if not is_loopback(host) and not api_key:
        raise SkillhubError(f"--host {host} exposes the server beyond this machine: give an API key with --api-key "
                            "or $SKILLHUB_API_KEY (or bind to 127.0.0.1 behind a reverse proxy)")


def run(app, *, host: str, port: int, drain_seconds: float, log_level: str = "info") -> None:
    """Serve ``app`` until interrupted; on SIGINT/SIGTERM, stop accepting and let requests in flight
    finish (up to ``drain_seconds``) before the engine stops."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=max(1, int(drain_seconds)))
