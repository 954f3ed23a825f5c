"""``skillhub serve``: the registry's skills behind one OpenAI-compatible endpoint (and its browser at
``/``); ``skillhub ui``: the registry browser alone."""

from __future__ import annotations

import click

from skillhub.cli.app import main, registry_of
from skillhub.cli.errors import plain
from skillhub.cli.options import base_option
from skillhub.errors import SkillhubError


@main.command()
@click.option("--registry", "registry_location", metavar="DIR|URL",
              help="Registry to serve (default: the global --registry, $SKILLHUB_HOME or the user data dir).")
@base_option()
@click.option("--base-path", help="Where the base weights are (default: the location recorded at add).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback needs an API key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="SKILLHUB_API_KEY", show_envvar=True,
              help="Required from clients as 'Authorization: Bearer KEY' on /v1 and /metrics.")
@click.option("--max-batch", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Most requests generated together (of one pack set).")
@click.option("--max-tokens", type=click.IntRange(1, 1 << 20), default=256, show_default=True,
              help="Most tokens per answer, and a request's default max_tokens.")
@click.option("--max-concurrent", type=click.IntRange(1, 100_000), default=64, show_default=True,
              help="Requests in flight (waiting or generating); beyond it, 429.")
@click.option("--max-body-bytes", type=click.IntRange(1024, 1 << 30), default=1 << 20, show_default=True,
              help="Largest request body; beyond it, 413.")
@click.option("--request-timeout", type=click.FloatRange(1, 86_400), default=300.0, show_default=True,
              help="Seconds a request may take, queued and generating; beyond it, 504.")
@click.option("--cache-sets", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Pack sets kept patched beside the base (memory: each costs the parameters it changes; "
                   "a switch to a set not kept decodes its packs again).")
@click.option("--device", help="Where the model runs: cpu, cuda, cuda:1... (default: cpu).")
@click.option("--allow-stale", is_flag=True, help="Route 'auto' with a stale router among the classes it knows.")
@click.pass_context
def serve(ctx: click.Context, registry_location: str | None, base: str | None, base_path: str | None, host: str,
          port: int, api_key: str | None, max_batch: int, max_tokens: int, max_concurrent: int, max_body_bytes: int,
          request_timeout: float, cache_sets: int, device: str | None, allow_stale: bool) -> None:
    """Serve every skill of a base behind one OpenAI-compatible endpoint (/v1/chat/completions,
    /v1/completions, /v1/models): model ids are the tasks, 'auto' (the router picks per request)
    and 'base'. Packs added or removed while it runs are picked up without a restart."""
    _require_extra("serve")
    from skillhub.serving.app import Limits, create_app
    from skillhub.serving.server import check_exposure, run

    check_exposure(host, api_key)
    registry = registry_of(ctx, registry_location)
    limits = Limits(max_batch=max_batch, max_tokens=max_tokens, max_concurrent=max_concurrent,
                    max_body_bytes=max_body_bytes, request_timeout=request_timeout, cache_sets=cache_sets)
    app = create_app(registry, base=base, base_location=base_path, limits=limits, api_key=api_key, device=device,
                     allow_stale=allow_stale)
    click.echo(plain(f"Serving {registry.display_url} at http://{host}:{port}/v1 "
                     f"(models: GET /v1/models; metrics: /metrics)"), err=True)
    run(app, host=host, port=port, drain_seconds=request_timeout)


@main.command()
@click.option("--registry", "registry_location", metavar="DIR|URL",
              help="Registry to show (default: the global --registry, $SKILLHUB_HOME or the user data dir).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback needs an API key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8001, show_default=True)
@click.option("--api-key", envvar="SKILLHUB_API_KEY", show_envvar=True,
              help="Required to open the pages (a form at /login sets it) and /api.")
@click.pass_context
def ui(ctx: click.Context, registry_location: str | None, host: str, port: int, api_key: str | None) -> None:
    """The registry browser alone, read-only and without loading a model: bases, lineage, packs,
    forgetting heatmaps, router and interference as web pages, the same data as JSON under /api/.
    `skillhub serve` shows the same pages at / with a playground."""
    _require_extra("ui")
    from skillhub.serving.app import create_browser_app
    from skillhub.serving.server import check_exposure, run

    check_exposure(host, api_key)
    registry = registry_of(ctx, registry_location)
    click.echo(plain(f"Browsing {registry.display_url} at http://{host}:{port}/"), err=True)
    run(create_browser_app(registry, api_key=api_key), host=host, port=port, drain_seconds=5)


def _require_extra(command: str) -> None:
    from importlib.util import find_spec

    for module in ("fastapi", "uvicorn", "jinja2", "prometheus_client"):
        if find_spec(module) is None:
            raise SkillhubError(f"{command} needs the serve extra ({module} is missing): pip install 'skillhub[serve]'")
