"""/api/logs, /api/logs/stats and /api/dashboard (SPEC §5): SQL aggregates plus live proxy figures."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import falcon
import falcon.asgi

from greyproxy.shapes import log_json
from greyproxy.timeutil import rfc3339

from . import store_ops
from .context import ApiContext
from .errors import bad_request
from .store_ops import LogFilter
from .util import int_param, json_response, soft_call, time_param

RESULTS = ("allowed", "blocked")
GROUP_BY = ("hour", "day", "week", "auto")
PERIODS = {"today": None, "7d": 7 * 86400.0, "30d": 30 * 86400.0}
STATS_TIMEOUT = 0.5  # live figures decorate the dashboard; a silent proxy must not stall it
TOP_CONTAINERS = 20
TOP_DESTINATIONS = 10
ALLOWALL_UNKNOWN = {"active": False, "mode": None, "expires_at": None, "remaining_seconds": None}


def start_of_day(ts: float) -> float:
    d = datetime.fromtimestamp(ts, timezone.utc)
    return datetime(d.year, d.month, d.day, tzinfo=timezone.utc).timestamp()


def auto_group(from_ts: float, to_ts: float) -> str:
    span = to_ts - from_ts
    if span <= 2 * 86400:
        return "hour"
    return "day" if span <= 60 * 86400 else "week"


def group_by_param(req: falcon.asgi.Request, from_ts: float, to_ts: float) -> str:
    value = req.get_param("group_by") or "auto"
    if value not in GROUP_BY:
        raise bad_request(f"group_by must be one of {', '.join(GROUP_BY)}")
    return auto_group(from_ts, to_ts) if value == "auto" else value


def time_range(req: falcon.asgi.Request, now: float, period: str = "today") -> tuple[float, float]:
    """from_date/to_date, defaulting to the period ("today" = since 00:00 UTC) up to now."""
    to_ts = time_param(req, "to_date")
    from_ts = time_param(req, "from_date")
    if to_ts is None:
        to_ts = now
    if from_ts is None:
        span = PERIODS[period]
        from_ts = start_of_day(min(to_ts, now)) if span is None else to_ts - span
    if from_ts > to_ts:
        raise bad_request("from_date must not be after to_date")
    return from_ts, to_ts


def stats_body(stats: dict[str, Any], from_ts: float, to_ts: float, group_by: str) -> dict[str, Any]:
    return {
        "period": {"from": rfc3339(from_ts), "to": rfc3339(to_ts)},
        "group_by": group_by,
        "total_requests": stats["total"],
        "allowed": stats["allowed"],
        "blocked": stats["blocked"],
        "top_containers": stats["containers"],
        "top_destinations": stats["destinations"],
        "timeline": [
            {"timestamp": rfc3339(t["ts"]), "allowed": t["allowed"], "blocked": t["blocked"]} for t in stats["timeline"]
        ],
    }


class LogsResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        result = req.get_param("result") or None
        if result is not None and result not in RESULTS:
            raise bad_request(f"result must be one of {', '.join(RESULTS)}")
        f = LogFilter(
            container=req.get_param("container") or None,
            destination=req.get_param("destination") or None,
            result=result,
            from_ts=time_param(req, "from_date"),
            to_ts=time_param(req, "to_date"),
        )
        limit = int_param(req, "limit", 50, lo=1)
        offset = int_param(req, "offset", 0, hi=10**9)
        rows, total = await self.ctx.db(store_ops.list_logs, f, limit, offset)
        json_response(
            resp,
            {
                "items": [log_json(r, r["rule_summary"]) for r in rows],
                "total": total,
                "page": offset // limit + 1,
                "pages": max(1, math.ceil(total / limit)),
            },
        )


class LogStatsResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        from_ts, to_ts = time_range(req, time.time())
        group_by = group_by_param(req, from_ts, to_ts)
        stats = await self.ctx.db(store_ops.log_stats, from_ts, to_ts, group_by, TOP_CONTAINERS, TOP_DESTINATIONS)
        json_response(resp, stats_body(stats, from_ts, to_ts, group_by))


async def live_figures(ctx: ApiContext) -> dict[str, Any]:
    """active_connections, waiting and the silent-mode status from the proxy; zeros when it is down."""
    stats = await soft_call(ctx.proxy, "stats", {}, timeout=STATS_TIMEOUT, retries=1)
    if not isinstance(stats, dict):
        return {"active_connections": 0, "waiting": 0, "allowall": dict(ALLOWALL_UNKNOWN)}
    allowall = stats.get("allowall")
    if not isinstance(allowall, dict):  # an older proxy without it in stats: ask directly
        allowall = await soft_call(ctx.proxy, "allowall.get", {}, timeout=STATS_TIMEOUT, retries=1)
    return {
        "active_connections": int(stats.get("active_connections") or 0),
        "waiting": int(stats.get("waiting") or 0),
        "allowall": allowall if isinstance(allowall, dict) else dict(ALLOWALL_UNKNOWN),
    }


def _dashboard_data(from_ts: float, to_ts: float, group_by: str, recent_limit: int) -> dict[str, Any]:
    stats = store_ops.log_stats(from_ts, to_ts, group_by, TOP_CONTAINERS, TOP_DESTINATIONS, recent_limit)
    stats["pending_count"] = store_ops.pending_count()
    return stats


class DashboardResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        period = req.get_param("period") or "today"
        if period not in PERIODS:
            raise bad_request(f"period must be one of {', '.join(PERIODS)}")
        from_ts, to_ts = time_range(req, time.time(), period)
        group_by = group_by_param(req, from_ts, to_ts)
        recent_limit = int_param(req, "recent_limit", 10, lo=0, hi=100)
        stats, live = await asyncio.gather(
            self.ctx.db(_dashboard_data, from_ts, to_ts, group_by, recent_limit), live_figures(self.ctx)
        )
        body = stats_body(stats, from_ts, to_ts, group_by)
        body.update(
            {
                "period_name": period,
                "allow_rate": round(stats["allowed"] * 100.0 / stats["total"], 2) if stats["total"] else 0.0,
                "by_container": stats["containers"],
                "top_blocked": stats["destinations"],
                "recent": [log_json(r, r["rule_summary"]) for r in stats["recent"]],
                "pending_count": stats["pending_count"],
                **live,
            }
        )
        json_response(resp, body)


def register(app: falcon.asgi.App, ctx: ApiContext, route: Callable[[str], str]) -> None:
    app.add_route(route("/api/logs"), LogsResource(ctx))
    app.add_route(route("/api/logs/stats"), LogStatsResource(ctx))
    app.add_route(route("/api/dashboard"), DashboardResource(ctx))
