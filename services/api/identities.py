"""/api/identities (SPEC §16): claim a client name, list, rotate and release claims.

The secret is in the answer to POST /api/identities and to .../rotate only; the database holds
its scrypt hash (greyproxy/identity.py). Every change is made synchronous with the proxy (the
`identities.reload` control call) before the answer, so a rotated secret fails from then on;
`identity.changed` (name, action, version: never a secret nor a hash) tells everyone else.
Releasing a claim ends the credential sessions that name it (`session.deleted` for each): bound to
the identity while it was claimed, they would otherwise substitute for anyone presenting the name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import falcon
import falcon.asgi

from bus import topics
from greyproxy.identity import MAX_NOTES, check_name, hash_secret, new_secret
from greyproxy.store import identities
from greyproxy.timeutil import rfc3339

from .context import ApiContext
from .credentials import proxy_reload
from .errors import ApiError, bad_request, not_found
from .util import json_response, read_json, soft_call, str_field

RELOAD_TIMEOUT = 3.0  # seconds the proxy gets to load the new claims before we answer anyway


def identity_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": row["name"],
        "notes": row["notes"],
        "created_at": rfc3339(row["created_at"]),
        "rotated_at": rfc3339(row["rotated_at"]),
        "last_used_at": rfc3339(row["last_used_at"]),
        "version": int(row["version"]),
    }


def _json(row: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if row is None else identity_json(row)


def _name(value: Any) -> str:
    try:
        return check_name(value)
    except ValueError as exc:
        raise bad_request(str(exc)) from None


async def _changed(ctx: ApiContext, name: str, action: str, version: int | None) -> None:
    # Synchronous with the proxy: once this returns, connections are judged by the new claims.
    await soft_call(ctx.proxy, "identities.reload", {}, timeout=RELOAD_TIMEOUT, retries=1)
    ctx.publish(topics.IDENTITY_CHANGED, {"name": name, "action": action, "version": version})


async def claim(ctx: ApiContext, name: str, notes: str | None = None) -> dict[str, Any] | None:
    """Claim `name`: {name, secret, created_at, ...}, or None when it is claimed already."""
    secret = new_secret()
    hashed = await ctx.db(hash_secret, secret)
    row = _json(await ctx.db(identities.create, name, notes, hashed))
    if row is None:
        return None
    await _changed(ctx, name, "created", row["version"])
    return {**row, "secret": secret}


async def rotate(ctx: ApiContext, name: str) -> dict[str, Any] | None:
    secret = new_secret()
    hashed = await ctx.db(hash_secret, secret)
    row = _json(await ctx.db(identities.rotate, name, hashed))
    if row is None:
        return None
    await _changed(ctx, name, "rotated", row["version"])
    return {**row, "secret": secret}


class IdentitiesResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        items = [identity_json(r) for r in await self.ctx.db(identities.list_all)]
        json_response(resp, {"items": items, "total": len(items)})

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = await read_json(req)
        if not isinstance(body, dict):
            raise bad_request("request body must be a JSON object")
        name = _name(body.get("name"))
        notes = str_field(body, "notes", None, max_len=MAX_NOTES)
        out = await claim(self.ctx, name, notes)
        if out is None:
            raise ApiError(409, f"identity {name!r} is claimed already (rotate it for a new secret)")
        json_response(resp, out, status=201)


class IdentityResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_delete(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, name: str) -> None:
        ctx = self.ctx
        ended = await ctx.db(identities.release, name)
        if ended is None:
            raise not_found(f"identity {name!r} is not claimed")
        if ended:
            # The credential sessions bound to the claim ended with it (store/identities.release):
            # the proxy drops them before it loads the claims without this one.
            await proxy_reload(ctx)
        await _changed(ctx, name, "deleted", None)
        for sid in ended:
            ctx.publish(topics.SESSION_DELETED, sid)
        resp.status = falcon.HTTP_204


class IdentityRotateResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, name: str) -> None:
        out = await rotate(self.ctx, name)
        if out is None:
            raise not_found(f"identity {name!r} is not claimed")
        json_response(resp, out)


ROTATE = "/rotate"
SLASHED = "-"  # the path segment a name with '/' is routed under (SlashedNames)


class SlashedNames:
    """Falcon middleware: `DELETE /api/identities/a/b` and `POST /api/identities/a/b/rotate` for
    a name with '/' (check_name takes it, and container names use it: `team/agent`).

    A route field is one path segment, and '%2F' arrives decoded (the server unquotes the path),
    so such a name matched no route (404): its claim could be neither rotated nor released.
    Falcon's `path` converter must end a template, which `…/rotate` does not. So before routing,
    a path under the identities with more segments is routed as the one named SLASHED, and the
    resource is then given the whole name as its `name`: the routes (and the OpenAPI document)
    stay those of SPEC §16. POST on `<name>/rotate` rotates `<name>`; DELETE takes the whole
    rest as the name (`DELETE …/x/rotate` releases a claim named 'x/rotate': no other DELETE
    is there)."""

    def __init__(self, base: str) -> None:
        self.base = base  # '<prefix>/api/identities/'

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        path = req.path
        raw = req.scope.get("path") if isinstance(req.scope, dict) else None
        if isinstance(raw, str) and raw != path and raw.rstrip("/") == path and raw.startswith(self.base):
            path = raw  # a name ending in '/' ('t1/', sent as t1%2F): the app strips a trailing slash
        if not path.startswith(self.base) or "/" not in path[len(self.base) :]:
            return
        name = path[len(self.base) :]
        rotate = req.method == "POST" and name.endswith(ROTATE)
        if rotate:
            name = name[: -len(ROTATE)]
        if "/" not in name:
            return  # an ordinary name's own route
        req.context.identity_name = name
        req.path = self.base + SLASHED + (ROTATE if rotate else "")

    async def process_resource(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, resource: Any, params: dict[str, Any]
    ) -> None:
        name = getattr(req.context, "identity_name", None)
        if name is not None and "name" in params:
            params["name"] = name


def register(app: falcon.asgi.App, ctx: ApiContext, route: Callable[[str], str]) -> None:
    app.add_middleware(SlashedNames(route("/api/identities/")))
    app.add_route(route("/api/identities"), IdentitiesResource(ctx))
    app.add_route(route("/api/identities/{name}"), IdentityResource(ctx))
    app.add_route(route("/api/identities/{name}/rotate"), IdentityRotateResource(ctx))
