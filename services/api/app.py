"""The Falcon ASGI application: every API area, registered from one list under the path prefix."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import falcon
import falcon.asgi
import falcon.media
import orjson

from . import errors, openapi
from .context import ApiContext
from .origin import LocalOnly
from .util import HeadAsGet, IdCheck, IdConverter

# route(path) puts the configured path prefix in front of an area's path.
Route = Callable[[str], str]
# An area adds its resources: register(app, ctx, route).
Area = Callable[[falcon.asgi.App, ApiContext, Route], object]

# Every area the API serves, in order: a module of this package with a register(app, ctx, route).
# A new area is one line here (its module is imported when the app is built, nothing registers
# itself on import).
AREAS: tuple[str, ...] = (
    "health",  # /api/health
    "allowall",  # /api/allowall
    "logs",  # /api/logs, /api/logs/stats, /api/dashboard
    "pending",  # /api/pending
    "rules",  # /api/rules
    "settings",  # /api/settings, /api/notifications
    "certs",  # /api/cert/*
    "maintenance",  # /api/maintenance/*
    "transactions",  # /api/transactions
    "export",  # /api/transactions/export.har
    "llm",  # /api/dissectors, /api/endpoint-rules, /api/conversations (SPEC §13)
    "credentials",  # /api/sessions, /api/credentials (SPEC §12)
    "metrics",  # /metrics
    "ws.resource",  # /ws
    "identities",  # /api/identities (SPEC §16)
    "explain",  # /api/rules/explain (SPEC §16)
    "ui",  # the dashboard: a sink for /, deep links and static/ (routes win over it)
)


def area_registers(names: Sequence[str] = AREAS) -> list[Area]:
    """The register function of each named area module, in order."""
    out: list[Area] = []
    for name in names:
        module = importlib.import_module(f"{__package__}.{name}")
        register = getattr(module, "register", None)
        if not callable(register):
            raise TypeError(f"API area {module.__name__} has no register(app, ctx, route)")
        out.append(register)
    return out


def create_app(ctx: ApiContext, areas: Sequence[Area] | None = None) -> falcon.asgi.App:
    """The app with `areas` (default: every one in AREAS), then /api/openapi.json describing them."""
    # LocalOnly: foreign Host (DNS rebinding) → 421, foreign Origin / cross-site writes → 403,
    # on every request and WebSocket upgrade, before routing. IdCheck: a bad {id} in a path → 400.
    # HeadAsGet: HEAD answered as GET without the body on every GET route (no 405).
    app = falcon.asgi.App(cors_enable=False, middleware=(HeadAsGet(), LocalOnly.from_config(ctx.cfg), IdCheck()))
    json_handler = falcon.media.JSONHandler(dumps=lambda o: orjson.dumps(o).decode(), loads=orjson.loads)
    app.req_options.media_handlers.update({falcon.MEDIA_JSON: json_handler})
    app.resp_options.media_handlers.update({falcon.MEDIA_JSON: json_handler})
    app.req_options.strip_url_path_trailing_slash = True
    app.router_options.converters["id"] = IdConverter  # {rule_id:id}: a row id or no route (404)
    errors.install(app)

    prefix = ctx.cfg.path_prefix.rstrip("/")

    def route(path: str) -> str:
        return f"{prefix}{path}"

    for register in area_registers() if areas is None else areas:
        register(app, ctx, route)
    openapi.register(app, ctx, route)  # last: it describes the routes the areas added
    return app
