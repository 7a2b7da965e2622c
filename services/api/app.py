"""The Falcon ASGI application: routes under the configured path prefix."""

from __future__ import annotations

from collections.abc import Callable

import falcon
import falcon.asgi
import falcon.media
import orjson

from . import errors
from .context import ApiContext
from .health import HealthResource
from .origin import LocalOnly
from .util import IdCheck, IdConverter

# Later areas register themselves here: fn(app, ctx, route) where route(path) adds the prefix.
ROUTE_PROVIDERS: list[Callable[[falcon.asgi.App, ApiContext, Callable[[str], str]], None]] = []


def create_app(ctx: ApiContext) -> falcon.asgi.App:
    # LocalOnly: foreign Host (DNS rebinding) → 421, foreign Origin / cross-site writes → 403,
    # on every request and WebSocket upgrade, before routing. IdCheck: a bad {id} in a path → 400.
    app = falcon.asgi.App(cors_enable=False, middleware=[LocalOnly.from_config(ctx.cfg), IdCheck()])
    json_handler = falcon.media.JSONHandler(dumps=lambda o: orjson.dumps(o).decode(), loads=orjson.loads)
    app.req_options.media_handlers.update({falcon.MEDIA_JSON: json_handler})
    app.resp_options.media_handlers.update({falcon.MEDIA_JSON: json_handler})
    app.req_options.strip_url_path_trailing_slash = True
    app.router_options.converters["id"] = IdConverter  # {rule_id:id}: a row id or no route (404)
    errors.install(app)

    prefix = ctx.cfg.path_prefix.rstrip("/")

    def route(path: str) -> str:
        return f"{prefix}{path}"

    app.add_route(route("/api/health"), HealthResource(ctx))
    for provider in ROUTE_PROVIDERS:
        provider(app, ctx, route)
    from . import openapi  # late: it reads the areas' constants, and the areas import this module

    openapi.register(app, ctx, route)  # last: it describes the routes the providers added
    return app
