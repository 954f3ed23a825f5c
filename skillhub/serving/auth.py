"""The API key: ``Authorization: Bearer KEY`` for clients, or a cookie set by ``/login`` for a
browser (which cannot add a header to a link it follows).

Keys are compared in constant time. The cookie is HttpOnly and SameSite=Strict, so the pages'
script never reads it and no other site's page can send it.
"""

from __future__ import annotations

import hmac
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from skillhub.serving.protocol import BadRequest

COOKIE = "skillhub_key"
_LOGIN = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>skillhub: API key</title>
<link rel="stylesheet" href="/static/browser.css"></head><body><main><h1>This skillhub server needs its API key</h1>
<form method="post" action="/login"><input type="password" name="key" autofocus> <button>Open</button></form>
{error}</main></body></html>"""


class Authorizer:
    """Checks a request's key when the server has one (``api_key`` None: every request passes)."""

    def __init__(self, api_key: str | None) -> None:
        self.api_key = api_key

    def matches(self, given: str) -> bool:
        return self.api_key is not None and hmac.compare_digest(given.encode(), self.api_key.encode())

    def __call__(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[len("Bearer "):] if header.startswith("Bearer ") else request.cookies.get(COOKIE, "")
        if not self.matches(given):
            raise BadRequest(401, "missing or wrong API key: send it as 'Authorization: Bearer KEY'",
                             code="invalid_api_key")

    def routes(self) -> APIRouter:
        """``/login``: a form that sets the cookie (only when the server has a key)."""
        routes = APIRouter()
        if self.api_key is None:
            return routes

        @routes.get("/login", response_class=HTMLResponse)
        async def login_form() -> HTMLResponse:
            return HTMLResponse(_LOGIN.format(error=""))

        @routes.post("/login")
        async def login(request: Request):
            given = parse_qs((await request.body())[:4096].decode(errors="replace")).get("key", [""])[0]
            if not self.matches(given):
                return HTMLResponse(_LOGIN.format(error='<p class="error">Wrong key.</p>'), status_code=401)
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, given, httponly=True, samesite="strict")
            return response

        return routes
