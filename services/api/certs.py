"""/api/cert/* (SPEC §7.1): the interception CA's status, generation, download and reload."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import falcon
import falcon.asgi

from greyproxy import certs

from .context import ApiContext
from .errors import ApiError, not_found
from .util import bool_param, json_response, soft_call


def _status(ctx: ApiContext) -> dict[str, Any]:
    return certs.ca_status(ctx.cfg.data_dir)


async def status(ctx: ApiContext) -> dict[str, Any]:
    # File reads (and `security` on macOS) stay off the event loop.
    return await asyncio.get_running_loop().run_in_executor(ctx.db_executor, _status, ctx)


class CertStatusResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        json_response(resp, await status(self.ctx))


class CertGenerateResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        force = bool_param(req, "force")
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.ctx.db_executor, certs.generate_ca, self.ctx.cfg.data_dir, force)
        except certs.CAExists as exc:
            raise ApiError(409, f"{exc}; POST with ?force=true to replace it") from None
        # New connections should use it now, not at the proxy's next file check; a down proxy picks it up later.
        await soft_call(self.ctx.proxy, "cert.reload", {}, timeout=1.0, retries=1)
        json_response(resp, {"message": "CA certificate generated", "certStatus": await status(self.ctx)})


class CertDownloadResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        cert_path, _ = certs.ca_paths(self.ctx.cfg.data_dir)
        try:
            pem = await asyncio.get_running_loop().run_in_executor(self.ctx.db_executor, cert_path.read_bytes)
        except FileNotFoundError:
            raise not_found("no CA certificate has been generated (POST /api/cert/generate)") from None
        resp.content_type = "application/x-pem-file"
        resp.set_header("Content-Disposition", "attachment; filename=greyproxy-ca.pem")
        resp.data = pem


class CertReloadResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        result = await self.ctx.proxy.call("cert.reload", {})  # a down proxy is a 503, not a silent no-op
        message = result.get("message") if isinstance(result, dict) else None
        json_response(
            resp,
            {
                "message": message if message in ("reloaded", "unchanged") else "unchanged",
                "certStatus": await status(self.ctx),
            },
        )


def register(app: falcon.asgi.App, ctx: ApiContext, route: Callable[[str], str]) -> None:
    app.add_route(route("/api/cert/status"), CertStatusResource(ctx))
    app.add_route(route("/api/cert/generate"), CertGenerateResource(ctx))
    app.add_route(route("/api/cert/download"), CertDownloadResource(ctx))
    app.add_route(route("/api/cert/reload"), CertReloadResource(ctx))
