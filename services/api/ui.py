"""The dashboard (SPEC §11): the app's HTML and its static assets, served by the API process.

Everything is package data under `services/api/static/` (hand-written HTML, CSS and JavaScript
modules; no build step, nothing fetched at run time). One Falcon sink serves it under the path
prefix:

- `<prefix>static/<file>` -- an asset, from memory, with a strong ETag (its SHA-256) and
  `Cache-Control: no-cache`, so a reload costs one 304 per file;
- `<prefix>ui/scopes?container=&host=&port=` -- the rule patterns each pending scope creates,
  computed by the same function the allow/deny API uses (`scope_patterns`, with the Public
  Suffix List), so the preview shown before a click is exactly the rule the click makes;
- any other path that is not the API's (`<prefix>api/...`) or the control socket's -- the app
  (`index.html`, with the prefix and a few facts of this config written in), so deep links such
  as `/transactions/42` answer 200 and the app routes on the client.

Routes take precedence over sinks in Falcon, and the sink's pattern excludes `api/` and `ws`,
so an unknown API path keeps its JSON 404. Every answer carries the strict CSP of §11 (no
inline script, no framing) and `X-Frame-Options: DENY` for older browsers.
"""

from __future__ import annotations

import hashlib
import html
import mimetypes
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import falcon
import falcon.asgi
import orjson

from greyproxy import __version__
from greyproxy.policy.scopes import SCOPES, scope_patterns
from greyproxy.redaction import DEFAULT_REDACTED_HEADERS

from .context import ApiContext
from .errors import ApiError

CSP = (
    "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self'; "
    "frame-ancestors 'none'; base-uri 'self'; form-action 'self'; object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
CACHE_CONTROL = "no-cache"  # always revalidate; the ETag makes that a 304
STATIC_DIR = "static"
INDEX = "index.html"
SCOPES_PATH = "ui/scopes"
TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
}
_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*\Z")


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def _asset(body: bytes, name: str) -> Asset:
    suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    ctype = TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
    return Asset(body, ctype, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


def load_assets() -> dict[str, Asset]:
    """Every file under static/ (except the page itself), by its path relative to static/."""
    out: dict[str, Asset] = {}

    def walk(node: Any, rel: str) -> None:
        for child in node.iterdir():
            path = f"{rel}{child.name}"
            if child.is_dir():
                walk(child, path + "/")
            elif child.is_file() and path != INDEX and not child.name.startswith("."):
                out[path] = _asset(child.read_bytes(), path)

    walk(resources.files(__package__).joinpath(STATIC_DIR), "")
    return out


def render_index(prefix: str, facts: dict[str, Any]) -> Asset:
    """index.html with the base URL (the prefix, ending in '/') and the config facts the app needs."""
    template = resources.files(__package__).joinpath(STATIC_DIR, INDEX).read_text("utf-8")
    base = prefix.rstrip("/") + "/"
    page = template.replace("{{base}}", html.escape(base, quote=True)).replace(
        "{{facts}}", html.escape(orjson.dumps(facts).decode(), quote=True)
    )
    return _asset(page.encode(), INDEX)


def ui_facts(ctx: ApiContext) -> dict[str, Any]:
    cfg = ctx.cfg
    try:
        hold = float(cfg.section("proxy")["holdTimeout"])
    except (KeyError, TypeError, ValueError):
        hold = 30.0
    listeners = {name: lst.port for name, lst in cfg.listeners.items()}
    return {
        "version": __version__,
        "holdTimeout": hold,
        "prefix": cfg.path_prefix.rstrip("/") + "/",
        "proxyPort": listeners.get("http-proxy"),
        "defaultRedactedHeaders": list(DEFAULT_REDACTED_HEADERS),
    }


class Dashboard:
    """The sink: the app page for client-side routes, files for `static/...`."""

    def __init__(self, prefix: str, facts: dict[str, Any], run: Callable[..., Any] | None = None) -> None:
        self.run = run  # runs a sync function off the event loop (the PSL's first load parses a big file)
        self.prefix = prefix.rstrip("/")
        self.index = render_index(self.prefix, facts)
        self.assets = load_assets()

    def pattern(self) -> re.Pattern[str]:
        # Everything under the prefix except api/... and ws (those stay JSON / the socket).
        return re.compile(re.escape(self.prefix) + r"(?:/(?!api(?:/|\Z)|ws\Z).*)?\Z")

    def lookup(self, path: str) -> Asset | None:
        """The asset for a request path (relative to the prefix); None for a missing static file."""
        rel = path[len(self.prefix) :].lstrip("/")
        if rel == STATIC_DIR or rel.startswith(STATIC_DIR + "/"):
            name = rel[len(STATIC_DIR) + 1 :]
            if not _SAFE_NAME.match(name):
                return None
            return self.assets.get(name)
        return self.index

    async def __call__(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response | None, ws: Any = None, **_: Any
    ) -> None:
        if resp is None:
            # A WebSocket upgrade on a dashboard path (the sink's pattern takes every path but
            # api/ and ws): refused before it is accepted, as an unknown path, with the JSON
            # body (errors._close_ws). `ws` in the signature is how Falcon 4 tells a sink to
            # take the socket there and resp=None; without it Falcon passed the socket as resp,
            # and its deprecation warning on the way failed on this object ('Dashboard' has no
            # '__qualname__'): an ERROR traceback per upgrade and a bare 403.
            raise ApiError(404, f"not found: the control WebSocket is at {self.prefix}/ws")
        for name, value in SECURITY_HEADERS.items():
            resp.set_header(name, value)
        if req.method not in ("GET", "HEAD"):
            resp.set_header("Allow", "GET, HEAD")
            raise ApiError(405, f"{req.method} is not allowed here: the dashboard is read with GET")
        if req.path == f"{self.prefix}/{SCOPES_PATH}":
            resp.set_header("Cache-Control", "no-store")
            resp.content_type = falcon.MEDIA_JSON
            args = (req.get_param("container"), req.get_param("host"), req.get_param("port"))
            preview = await self.run(scope_preview, *args) if self.run else scope_preview(*args)
            resp.data = orjson.dumps(preview)
            return
        asset = self.lookup(req.path)
        if asset is None:
            raise ApiError(404, f"no such dashboard file: {req.path}")
        resp.content_type = asset.content_type
        resp.set_header("Cache-Control", CACHE_CONTROL)
        resp.etag = asset.etag
        if _etag_matches(req.get_header("If-None-Match"), asset.etag):
            resp.status = falcon.HTTP_304
            return
        resp.data = asset.body


def scope_preview(container: str | None, host: str | None, port: str | None) -> dict[str, Any]:
    """{scope: {container_pattern, destination_pattern, port_pattern}} for one pending entry."""
    if not container or not host or not port:
        raise ApiError(400, "container, host and port are required")
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ApiError(400, f"port must be a number from 1 to 65535, not {port[:20]!r}")
    out: dict[str, Any] = {}
    for scope in SCOPES:
        try:
            c, d, p = scope_patterns(scope, container, host, int(port))
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        out[scope] = {"container_pattern": c, "destination_pattern": d, "port_pattern": p}
    return out


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return etag in tags or "*" in tags


def register(app: falcon.asgi.App, ctx: ApiContext, route: Callable[[str], str]) -> Dashboard:
    dashboard = Dashboard(ctx.cfg.path_prefix, ui_facts(ctx), ctx.db)
    # (its resp is None on a WebSocket upgrade, as Falcon's AsgiSinkCallable has it: see __call__)
    app.add_sink(dashboard, dashboard.pattern())
    return dashboard
