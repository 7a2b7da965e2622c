"""GET <pathPrefix>metrics (SPEC §14): the processes' heartbeats in the Prometheus text format."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import falcon
import falcon.asgi
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from greyproxy.metrics import HeartbeatCollector

from .context import ApiContext
from .health import WATCHED

METRICS_PATH = "/metrics"


def heartbeat_snapshot(ctx: ApiContext) -> dict[str, tuple[bool, dict[str, Any]]]:
    """{service: (up, stats)}: up = a fresh heartbeat from a ready process (the API itself: always)."""
    now = time.time()
    out: dict[str, tuple[bool, dict[str, Any]]] = {}
    for name in WATCHED:
        seen = ctx.seen.get(name)
        if seen is None:
            out[name] = (False, {})
        else:
            out[name] = (now - seen.last_seen <= ctx.stale_after() and seen.ready, seen.stats)
    out["api"] = (True, {"pid": os.getpid()})
    return out


class MetricsResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(HeartbeatCollector(lambda: heartbeat_snapshot(ctx)))

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = CONTENT_TYPE_LATEST
        resp.set_header("Cache-Control", "no-store")
        resp.data = generate_latest(self.registry)


def register(app: falcon.asgi.App, ctx: ApiContext, route: Callable[[str], str]) -> None:
    app.add_route(route(METRICS_PATH), MetricsResource(ctx))
