"""The registry browser: a base's lineage, packs, forgetting, router and interference as web
pages, and the same data as JSON under ``/api/``.

Read-only: only GET routes, and nothing here writes to the registry. Each ``/api/`` route returns
what the matching ``--json`` command prints, from the same call and the same serialiser
(:func:`skillhub.registry.results.as_json`):

=================  =====================================
``/api/bases``     the registered bases (with counts)
``/api/packs``     ``skillhub list --all --json``
``/api/packs/ID``  ``skillhub show ID --json``
``/api/log``       ``skillhub log --json``
``/api/tasks``     ``skillhub task list --json``
``/api/metrics``   ``skillhub metrics --json``
``/api/router``    ``skillhub route show --json``
=================  =====================================

Pages are rendered on the server by Jinja2 with autoescaping (names, cards and prompts are
user data: a pack named ``<script>`` shows as text). Charts are SVG drawn on the server
(:mod:`~skillhub.serving.charts`); the one script (the playground's stream) is served from
``/static``. A Content-Security-Policy of ``'self'`` keeps every page from loading anything from
elsewhere. The packs table is sorted and paginated on the server, so a 10,000-pack registry
sends one page of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool

from skillhub.errors import NotFoundError, RegistryError, SkillhubError
from skillhub.evaluation.forgetting import accuracy_matrices
from skillhub.pack.card import render_card
from skillhub.registry.front import Registry
from skillhub.registry.results import as_json
from skillhub.routing.training import load_router, router_report
from skillhub.serving import charts

HERE = Path(__file__).resolve().parent
PAGE_SIZE = 100
SORTABLE = ("position", "id", "task", "name", "bytes", "ratio", "added_at", "state")
MAX_INTERFERENCE_PACKS = 12  # pairwise analysis decodes every pack: beyond this, use the CLI
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_STATIC = {"browser.css": "text/css", "browser.js": "text/javascript"}


class Browser:
    """The reports behind the pages and ``/api/`` (each a registry call, as the CLI makes it)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def base_name(self, base: str | None) -> str:
        return self.registry.activation_set(packs=[], base=base)[0].name

    def bases(self) -> list[dict[str, Any]]:
        rows = []
        for entry in self.registry.bases():
            packs, tasks = self.registry.list_packs(base=entry.name), self.registry.tasks(base=entry.name)
            try:  # its staleness from the listings at hand (router_report would read them again)
                stale = load_router(self.registry, base=entry.name).staleness(
                    [p.id for p in packs], {t.name: list(t.packs) for t in tasks})
                router: str | None = "stale" if any(stale.values()) else "current"
            except NotFoundError:
                router = None
            rows.append({**entry.as_dict(), "packs": len(packs), "bytes": sum(p.bytes for p in packs),
                         "tasks": [t.name for t in tasks], "router": router})
        return rows

    def packs(self, base: str | None) -> list[dict[str, Any]]:
        return as_json(self.registry.list_packs(base=base, include_removed=True))

    def pack(self, pack_id: str) -> dict[str, Any]:
        return as_json(self.registry.show(pack_id))

    def log(self, base: str | None) -> list[dict[str, Any]]:
        return as_json(self.registry.log(base=base))

    def tasks(self, base: str | None) -> list[dict[str, Any]]:
        return as_json(self.registry.tasks(base=base))

    def metrics(self, base: str | None) -> dict[str, Any]:
        return as_json(accuracy_matrices(self.registry, base=base))

    def router(self, base: str | None) -> dict[str, Any]:
        return as_json(router_report(self.registry, base=base))

    def interference(self, base: str | None) -> dict[str, Any]:
        from skillhub.scoring.interference import interference

        entries = self.registry.list_packs(base=base)
        labels = [f"{e.task}:{e.id[:6]}" for e in entries]
        if len(entries) < 2 or len(entries) > MAX_INTERFERENCE_PACKS:
            return {"packs": labels, "pairs": []}
        opened = self.registry.packs_by_id([e.id for e in entries], base=base)
        return interference([opened[e.id] for e in entries], labels=labels).as_dict()


def browser_routes(registry: Registry, *, authorize, playground: bool) -> APIRouter:
    """The browser's routes; ``authorize(request)`` raises when the request lacks the API key."""
    browser = Browser(registry)
    templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    routes = APIRouter()

    def page(name: str, request: Request, **context: Any) -> HTMLResponse:
        html = templates.get_template(name).render(playground=playground, path=request.url.path,
                                                   base_query=_base_query(request), **context)
        return HTMLResponse(html, headers=SECURITY_HEADERS)

    async def call(request: Request, function, *args) -> Any:
        authorize(request)
        return await run_in_threadpool(function, *args)

    def api(path: str, function) -> None:
        @routes.get(path)
        async def endpoint(request: Request, base: str | None = None) -> JSONResponse:
            return JSONResponse(await call(request, function, base), headers=SECURITY_HEADERS)

    api("/api/packs", browser.packs)
    api("/api/log", browser.log)
    api("/api/tasks", browser.tasks)
    api("/api/metrics", browser.metrics)
    api("/api/router", browser.router)

    @routes.get("/api/bases")
    async def api_bases(request: Request) -> JSONResponse:
        return JSONResponse(await call(request, browser.bases), headers=SECURITY_HEADERS)

    @routes.get("/api/packs/{pack_id}")
    async def api_pack(request: Request, pack_id: str) -> JSONResponse:
        return JSONResponse(await call(request, browser.pack, pack_id), headers=SECURITY_HEADERS)

    @routes.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in _STATIC:
            raise NotFoundError("file", name, where="in the browser's static files")
        return Response((HERE / "static" / name).read_bytes(), media_type=_STATIC[name], headers=SECURITY_HEADERS)

    @routes.get("/", response_class=HTMLResponse)
    async def index(request: Request) -> HTMLResponse:
        return page("index.html", request, bases=await call(request, browser.bases))

    @routes.get("/lineage", response_class=HTMLResponse)
    async def lineage(request: Request, base: str | None = None) -> HTMLResponse:
        events = await call(request, browser.log, base)
        return page("lineage.html", request, base=await run_in_threadpool(browser.base_name, base), events=events)

    @routes.get("/packs", response_class=HTMLResponse)
    async def packs(request: Request, base: str | None = None, sort: str = "position", order: str = "asc",
                    page_number: int = 1) -> HTMLResponse:
        if sort not in SORTABLE or order not in ("asc", "desc"):
            raise SkillhubError(f"packs can be sorted by {', '.join(SORTABLE)}, asc or desc")
        rows = await call(request, browser.packs, base)
        rows.sort(key=lambda r: (r[sort] is None, r[sort]), reverse=order == "desc")
        pages = max(1, -(-len(rows) // PAGE_SIZE))
        page_number = min(max(1, page_number), pages)
        shown = rows[(page_number - 1) * PAGE_SIZE: page_number * PAGE_SIZE]
        details = await run_in_threadpool(registry.manifests, [r["id"] for r in shown])
        for row in shown:
            row["operators"] = _operators_by_role(details[row["id"]])
            row["origin"] = _origin(details[row["id"]])
        return page("packs.html", request, base=await run_in_threadpool(browser.base_name, base), rows=shown,
                    total=len(rows), sort=sort, order=order, page_number=page_number, pages=pages)

    @routes.get("/packs/{pack_id}", response_class=HTMLResponse)
    async def pack(request: Request, pack_id: str) -> HTMLResponse:
        details = await call(request, browser.pack, pack_id)
        manifest = details["manifest"]
        modules = [{"name": name, **entry, "rank": entry.get("meta", {}).get("rank"),
                    "bits": _bits(entry)} for name, entry in manifest.get("modules", {}).items()]
        return page("pack.html", request, pack=details, modules=modules, card=render_card(manifest),
                    operators=_operators_by_role(manifest), origin=_origin(manifest))

    @routes.get("/tasks", response_class=HTMLResponse)
    async def tasks(request: Request, base: str | None = None) -> HTMLResponse:
        task_sets = await call(request, browser.tasks, base)
        try:
            metrics: dict[str, Any] | None = await run_in_threadpool(browser.metrics, base)
        except RegistryError as exc:
            metrics, why = None, str(exc)
        else:
            why = None
        return page("tasks.html", request, base=await run_in_threadpool(browser.base_name, base), tasks=task_sets,
                    metrics=metrics, why=why, heatmaps=_heatmaps(metrics) if metrics else [],
                    lines=_lines(metrics) if metrics else "")

    @routes.get("/router", response_class=HTMLResponse)
    async def router(request: Request, base: str | None = None) -> HTMLResponse:
        authorize(request)
        try:
            report: dict[str, Any] | None = await run_in_threadpool(browser.router, base)
        except NotFoundError as exc:
            report, why = None, str(exc)
        else:
            why = None
        confusion = ""
        if report and report["info"].get("confusion", {}).get("heldout"):
            names = [c["name"] for c in report["classes"]]
            confusion = charts.heatmap(report["info"]["confusion"]["heldout"], names, names, digits=0,
                                       title="held-out examples: true class (rows) by routed class (columns)")
        return page("router.html", request, base=await run_in_threadpool(browser.base_name, base), router=report,
                    why=why, confusion=confusion)

    @routes.get("/interference", response_class=HTMLResponse)
    async def interference(request: Request, base: str | None = None) -> HTMLResponse:
        report = await call(request, browser.interference, base)
        return page("interference.html", request, base=await run_in_threadpool(browser.base_name, base),
                    report=report, limit=MAX_INTERFERENCE_PACKS, matrix=_interference_matrix(report))

    if playground:
        @routes.get("/playground", response_class=HTMLResponse)
        async def playground_page(request: Request, base: str | None = None) -> HTMLResponse:
            task_sets = await call(request, browser.tasks, base)
            models = ["auto", "base", *(t["name"] for t in task_sets if t["packs"])]
            return page("playground.html", request, base=await run_in_threadpool(browser.base_name, base),
                        models=models)

    return routes


# ---------------------------------------------------------------------- page data


def _base_query(request: Request) -> str:
    base = request.query_params.get("base")
    from urllib.parse import urlencode

    return "?" + urlencode({"base": base}) if base else ""


def _operators_by_role(manifest: dict[str, Any]) -> dict[str, list[str]]:
    roles: dict[str, set[str]] = {}
    for entry in manifest.get("modules", {}).values():
        roles.setdefault(entry.get("role", "?"), set()).add(entry.get("operator", "?"))
    return {role: sorted(ops) for role, ops in sorted(roles.items())}


def _origin(manifest: dict[str, Any]) -> dict[str, Any]:
    graft = manifest.get("graft") or {}
    return {"hub": manifest.get("source"), "graft": (graft.get("source") or {}).get("id") if graft else None}


def _bits(entry: dict[str, Any]) -> str:
    groups = entry.get("meta", {}).get("groups") or entry.get("params", {}).get("groups")
    if groups and all(isinstance(g, list) and len(g) == 2 for g in groups):
        return " / ".join(f"{rank}x{bits}b" for rank, bits in groups)
    bits = entry.get("params", {}).get("bits")
    return f"{bits}b" if bits else ""


def _heatmaps(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    tasks = metrics["tasks"]
    maps = []
    for policy, result in metrics["policies"].items():
        svg = charts.heatmap(result["R"], [f"after {t}" for t in tasks], tasks, low=0.0, high=1.0,
                             title=f"R[k][j], {policy}")
        maps.append({"policy": policy, "svg": svg, "metrics": result["metrics"] or {}})
    return maps


def _lines(metrics: dict[str, Any]) -> str:
    policy = "subset" if "subset" in metrics["policies"] else next(iter(metrics["policies"]))
    matrix = metrics["policies"][policy]["R"]
    series = {task: [row[j] for row in matrix] for j, task in enumerate(metrics["tasks"])}
    return charts.line_chart(series, [f"+{t}" for t in metrics["tasks"]],
                             title=f"each task's score over the lineage ({policy})")


def _interference_matrix(report: dict[str, Any]) -> str:
    labels = report["packs"]
    if not report["pairs"]:
        return ""
    index = {label: i for i, label in enumerate(labels)}
    matrix: list[list[float | None]] = [[1.0 if i == j else None for j in labels] for i in labels]
    for pair in report["pairs"]:
        i, j = (index[label] for label in pair["packs"])
        matrix[i][j] = matrix[j][i] = pair["overall"]["cosine"]
    return charts.heatmap(matrix, labels, labels, low=-1.0, high=1.0, title="cosine of the packs' deltas")
