"""The Falcon ASGI application: every API area, registered from one list under the path prefix."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import falcon
import falcon.asgi
import falcon.media
import orjson

from . import allowall, certs, errors, health, logs, maintenance, openapi, pending, rules, settings, transactions
from .context import ApiContext
from .origin import LocalOnly, configured_hosts
from .util import IdConverter
from .ws import resource as ws_resource

# route(path) puts the configured path prefix in front of an area's path.
Route = Callable[[str], str]
# An area adds its resources: register(app, ctx, route).
Area = Callable[[falcon.asgi.App, ApiContext, Route], object]

# Every area the API serves, one line each (a new area: its module's register here).
AREAS: tuple[Area, ...] = (
    health.register,  # /api/health
    allowall.register,  # /api/allowall
    logs.register,  # /api/logs, /api/logs/stats, /api/dashboard
    pending.register,  # /api/pending
    rules.register,  # /api/rules
    settings.register,  # /api/settings, /api/notifications
    certs.register,  # /api/cert/*
    maintenance.register,  # /api/maintenance/*
    transactions.register,  # /api/transactions
    ws_resource.register,  # /ws
)


def create_app(ctx: ApiContext, areas: Sequence[Area] = AREAS) -> falcon.asgi.App:
    # LocalOnly: foreign Host (DNS rebinding) → 421, foreign Origin / cross-site writes → 403,
    # on every request and WebSocket upgrade, before routing.
    app = falcon.asgi.App(cors_enable=False, middleware=[LocalOnly(configured_hosts(ctx.cfg))])
    json_handler = falcon.media.JSONHandler(dumps=lambda o: orjson.dumps(o).decode(), loads=orjson.loads)
    app.req_options.media_handlers.update({falcon.MEDIA_JSON: json_handler})
    app.resp_options.media_handlers.update({falcon.MEDIA_JSON: json_handler})
    app.req_options.strip_url_path_trailing_slash = True
    app.router_options.converters["id"] = IdConverter  # {rule_id:id}: a row id or no route (404)
    errors.install(app)

    prefix = ctx.cfg.path_prefix.rstrip("/")

    def route(path: str) -> str:
        return f"{prefix}{path}"

    for register in areas:
        register(app, ctx, route)
    openapi.register(app, ctx, route)  # last: it describes the routes the areas added
    return app
