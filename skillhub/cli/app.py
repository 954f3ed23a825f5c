"""The ``skillhub`` group: global options, logging, and the one place errors become lines."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import click

from skillhub import __version__, config
from skillhub.cli.errors import error_line, plain
from skillhub.errors import SkillhubError


class SkillhubGroup(click.Group):
    """Turns every SkillhubError into one ``Error: ...`` line and exit status 1, in one place.

    Usage errors keep click's exit status 2. Any other exception is a bug in skillhub: it too ends
    as one ``Error:`` line (exit status 1) that says so, with the traceback only under ``-v`` or
    ``$SKILLHUB_DEBUG``, so a user never has to read a traceback to learn that something failed.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SkillhubError as exc:
            if config.debug():
                raise
            click.echo(error_line(exc), err=True)
            ctx.exit(1)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - the last resort: one line instead of a traceback
            if config.debug() or ctx.params.get("verbose"):
                raise
            detail = (str(exc).strip().splitlines() or [""])[0]
            click.echo(plain(f"Error: unexpected {type(exc).__name__}{': ' + detail if detail else ''} (a bug in "
                             "skillhub: rerun with -v for the traceback and report it)"), err=True)
            ctx.exit(1)


class RedactingFilter(logging.Filter):
    """Removes credentials from every log record: at -vv the HTTP libraries log request and
    response headers verbatim, and a server may echo the Authorization header back."""

    _SECRETS = (
        re.compile(r"(?i)(authorization['\"]?\s*[,:=]\s*b?['\"]?)[^'\"\s)]+(\s+[^'\"\s)]+)?"),
        re.compile(r"(?i)\b(bearer|basic|token)\s+[A-Za-z0-9._~+/=-]{8,}"),
        re.compile(r"\bhf_[A-Za-z0-9_]{6,}"),
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for pattern in self._SECRETS:
            message = pattern.sub(lambda m: (m.group(1) if m.re.groups else "") + "[redacted]", message)
        record.msg, record.args = message, None
        return True


@click.group(cls=SkillhubGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--registry", "registry_location", metavar="DIR|URL",
              help="Registry directory or SQLAlchemy URL (default: $SKILLHUB_HOME or the user data dir).")
@click.option("--store", type=click.Path(path_type=Path), help="Directory of pack files (default: <registry>/packs).")
@click.option("--json", "as_json", is_flag=True, help="JSON output for every command that prints results.")
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-vv for debug).")
@click.version_option(__version__, prog_name="skillhub")
def main(registry_location: str | None, store: Path | None, as_json: bool, verbose: int) -> None:
    """skillhub: compressed, removable fine-tune deltas (SkillPacks) for Hugging Face models."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def registry_of(ctx: click.Context, location: str | None = None):
    """The registry the global ``--registry`` and ``--store`` options name (``location``: a command's
    own ``--registry``, which wins)."""
    from skillhub.registry import Registry

    root = ctx.find_root().params
    return Registry(location or root.get("registry_location"), store=root.get("store"))
