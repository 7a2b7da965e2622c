"""/api/maintenance/* (SPEC §10): starting jobs and reading their progress, over req/rep to the
maintenance process (which answers 409 itself when the job already runs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import falcon
import falcon.asgi

from greyproxy.llm import ASSEMBLER_VERSION
from greyproxy.store.models import meta_value

from .context import ApiContext
from .llm import conversations_status
from .settings import current_settings
from .util import json_response


def _stored_assembler_version() -> tuple[int, bool]:
    """(the assembler version the conversations were built with, whether a rebuild stopped half-way)."""
    return meta_value("assembler_version"), bool(meta_value("conversations_rebuild_unfinished"))


class JobStartResource:
    def __init__(self, ctx: ApiContext, job: str) -> None:
        self.ctx = ctx
        self.job = job

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        await self.ctx.maintenance.call("job.start", {"job": self.job})
        json_response(resp, {"status": "started", "job": self.job}, status=202)


class MaintenanceStatusResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        result: Any = await self.ctx.maintenance.call("job.status", {})
        jobs = result.get("jobs", {}) if isinstance(result, dict) else {}
        stored, unfinished = await self.ctx.db(_stored_assembler_version)
        enabled = bool((await current_settings(self.ctx)).get("conversationsEnabled", True))
        json_response(
            resp,
            {
                "jobs": jobs,
                "assembler_version_current": ASSEMBLER_VERSION,
                "assembler_version_stored": stored,
                "needs_rebuild": stored != ASSEMBLER_VERSION or unfinished,
                "conversations": await self.ctx.db(conversations_status, enabled),
            },
        )


def register(app: falcon.asgi.App, ctx: ApiContext, route: Callable[[str], str]) -> None:
    app.add_route(route("/api/maintenance/redact-headers"), JobStartResource(ctx, "redact-headers"))
    app.add_route(route("/api/maintenance/status"), MaintenanceStatusResource(ctx))
