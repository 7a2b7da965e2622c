"""GET /api/health: each service's state from its heartbeats, the database, 503 naming what is down."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import falcon

from bus import topics
from bus.pubsub import Subscriber
from greyproxy import __version__
from greyproxy.timeutil import rfc3339

from .context import ApiContext, ServiceSeen
from .util import json_response

log = logging.getLogger("greyproxy.api")

WATCHED = ("bus", "proxy", "recorder", "maintenance")


async def track_heartbeats(ctx: ApiContext) -> None:
    sub = Subscriber(ctx.cfg.bus["sub"], [topics.SERVICE_HEARTBEAT])
    try:
        while True:
            msg = await sub.recv()
            data = msg.get("data") or {}
            name = data.get("service")
            if not isinstance(name, str):
                continue
            ctx.seen[name] = ServiceSeen(
                pid=int(data.get("pid") or 0), last_seen=time.time(),
                started_at=float(data.get("started_at") or 0), uptime=float(data.get("uptime") or 0),
                stats=data.get("stats") or {},
            )
    finally:
        sub.close()


def _db_ok() -> bool:
    from greyproxy.store import database

    database.execute_sql("SELECT 1").fetchone()
    return True


class HealthResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        ctx = self.ctx
        now = time.time()
        services: dict[str, dict] = {}
        down: list[str] = []
        for name in WATCHED:
            seen = ctx.seen.get(name)
            up = seen is not None and now - seen.last_seen <= ctx.stale_after()
            services[name] = {
                "up": up,
                "pid": seen.pid if seen else None,
                "last_seen": rfc3339(seen.last_seen) if seen else None,
                "uptime": round(seen.uptime, 1) if seen else None,
            }
            if not up:
                down.append(name)
        services["api"] = {"up": True, "pid": os.getpid(), "last_seen": rfc3339(now),
                           "uptime": round(now - ctx.started_at, 1)}
        try:
            db_up = await asyncio.wait_for(ctx.db(_db_ok), 2.0)
        except Exception as exc:  # any failure here means the database is not usable
            log.warning("health: database check failed: %s", exc)
            db_up = False
        if not db_up:
            down.append("database")
        body = {
            "service": "greyproxy",
            "version": __version__,
            "status": "ok" if not down else "degraded",
            "ports": ctx.cfg.ports(),
            "services": services,
            "database": {"up": db_up, "path": str(ctx.cfg.db_path)},
        }
        if down:
            body["down"] = down
            body["error"] = f"down: {', '.join(down)}"
        json_response(resp, body, 200 if not down else 503)
