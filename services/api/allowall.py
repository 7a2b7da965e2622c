"""/api/allowall (SPEC §4): silent allow-all / deny-all lives in the proxy; the API forwards to it.

The API publishes allowall.changed (services/api/proxies.py: when set or cleared through it, and
when the timer runs out). A proxy that does not answer gives 503 (errors.py maps ServiceUnavailable).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import falcon
import falcon.asgi

from .context import ApiContext
from .errors import bad_request
from .util import int_field, json_response, read_json, refuse_unknown, str_field

MODES = ("allow", "deny")
MAX_DURATION = 28_800  # 8 h: a silent mode is for debugging, not a way of life
# Names a client may send for duration_seconds: refused with the right one (ignored, the mode
# would last until restart).
ALLOWALL_HINTS = {
    name: "did you mean 'duration_seconds'?"
    for name in ("ttl", "ttl_seconds", "expires", "expires_at", "expires_in_seconds", "dur", "seconds")
}


def parse_allowall(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    refuse_unknown(body, ("mode", "duration_seconds"), ALLOWALL_HINTS)
    mode = str_field(body, "mode", "allow")
    if mode not in MODES:
        raise bad_request(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    duration = int_field(body, "duration_seconds", 0, lo=0, hi=MAX_DURATION)
    return {"mode": mode, "duration_seconds": duration}


class AllowAllResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        json_response(resp, await self.ctx.proxy.call("allowall.get", {}))

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        args = parse_allowall(await read_json(req, default={}))
        json_response(resp, await self.ctx.proxy.call("allowall.set", args))

    async def on_delete(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        json_response(resp, await self.ctx.proxy.call("allowall.clear", {}))


def register(app: falcon.asgi.App, ctx: ApiContext, route: Callable[[str], str]) -> None:
    app.add_route(route("/api/allowall"), AllowAllResource(ctx))
