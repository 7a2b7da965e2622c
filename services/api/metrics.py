"""GET <pathPrefix>metrics (SPEC §14): the processes' heartbeats in the Prometheus text format."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import falcon
import falcon.asgi

from greyproxy.metrics import HeartbeatCollector, sum_stats

from .context import ApiContext
from .health import WATCHED, proxy_names

METRICS_PATH = "/metrics"


def heartbeat_snapshot(ctx: ApiContext) -> dict[str, tuple[bool, dict[str, Any]]]:
    """{service: (up, stats)}: up = a fresh heartbeat from a ready process (the API itself: always)."""
    now = time.time()
    out: dict[str, tuple[bool, dict[str, Any]]] = {}
    names = [n for n in WATCHED if n != "proxy"]
    names[1:1] = proxy_names(ctx)  # "proxy", or each worker (proxy-0 ...) and proxies on other hosts
    for name in names:
        seen = ctx.seen.get(name)
        if seen is None:
            out[name] = (False, {})
        else:
            # counters go on from where the earlier processes of this name left them
            stats = sum_stats([seen.stats, seen.carried]) if seen.carried else seen.stats
            out[name] = (now - seen.last_seen <= ctx.stale_after() and seen.ready, stats)
    workers = [n for n in names if ctx.seen.get(n) is not None and ctx.seen[n].role == "proxy"]
    if "proxy" not in out and workers:
        # The proxy's figures are the sum over its processes (each also has its greyproxy_up line).
        out["proxy"] = (all(out[n][0] for n in workers), sum_stats([out[n][1] for n in workers]))
    if ctx.departed_counters and "proxy" in out:  # proxies on other hosts that have left
        out["proxy"] = (out["proxy"][0], sum_stats([out["proxy"][1], ctx.departed_counters]))
    out["api"] = (True, {"pid": os.getpid()})
    return out


class MetricsResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        self.registry: Any = None  # built by the first scrape: prometheus_client loads only in an API that is scraped

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if self.registry is None:
            self.registry = CollectorRegistry(auto_describe=False)
            self.registry.register(HeartbeatCollector(lambda: heartbeat_snapshot(self.ctx)))
        resp.content_type = CONTENT_TYPE_LATEST
        resp.set_header("Cache-Control", "no-store")
        resp.data = generate_latest(self.registry)

    async def on_head(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        """What GET answers, without the body (a probe's HEAD got 405)."""
        await self.on_get(req, resp)


def register(app: falcon.asgi.App, ctx: ApiContext, route: Callable[[str], str]) -> None:
    app.add_route(route(METRICS_PATH), MetricsResource(ctx))
