"""/api/pending: the queue of unknown destinations and the decisions on it (SPEC §3.2).

`decide` and `dismiss` are the one implementation of a decision: the /ws commands call them
too, so REST and WebSocket have the same effects and events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import falcon
import falcon.asgi

from bus import topics
from greyproxy.policy import SCOPES, parse_duration
from greyproxy.shapes import pending_json, rule_json

from . import store_ops
from .context import ApiContext
from .errors import bad_request, not_found
from .rules import proxy_block, proxy_reload, publish_cleaned, publish_rule_created
from .store_ops import InvalidInput, PendingDecision
from .util import id_list_field, int_param, json_response, read_json, refuse_unknown, soft_call, str_field

WAITERS_TIMEOUT = 0.3  # the waiting counts decorate the list; never hold the list up for them
MAX_NOTES = 10_000
DECISION_ACTIONS = ("allow", "deny")
DECISION_FIELDS = ("scope", "duration", "notes")
_RULE_EXPIRY = (
    "did you mean 'duration'? A decision's rule lasts for a 'duration' (once, 1h, 7d, permanent, ...);"
    " expires_at and expires_in_seconds are POST /api/rules fields."
)
# Expiry fields a client may send for `duration` (the rule API's own first): refused with a
# hint instead of a permanent rule.
DECISION_HINTS = {
    "expires_at": _RULE_EXPIRY,
    "expires_in_seconds": _RULE_EXPIRY,
    **{name: "did you mean 'duration'?" for name in ("ttl", "ttl_seconds", "expires", "expiry", "dur", "lifetime")},
}


def parse_decision(body: Any, known: tuple[str, ...] = DECISION_FIELDS) -> tuple[str, float | None, str | None]:
    """(scope, seconds until the rule expires or None, notes) from an allow/deny body; any other
    field → 400 (it would be ignored, and the default is a permanent rule)."""
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    refuse_unknown(body, known, DECISION_HINTS)
    scope = str_field(body, "scope", "exact")
    if scope not in SCOPES:
        raise bad_request(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    duration = str_field(body, "duration", "permanent")
    try:
        seconds = parse_duration(duration)
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    return scope, seconds, str_field(body, "notes", max_len=MAX_NOTES)


def _publish_decision(ctx: ApiContext, d: PendingDecision, action: str) -> dict[str, Any]:
    rule = rule_json(d.rule)
    if d.created:
        publish_rule_created(ctx, d.rule, d.replaced)
    topic = topics.PENDING_ALLOWED if action == "allow" else topics.PENDING_DISMISSED
    ctx.publish(topic, {"pending_id": d.pending_id, "rule": rule})
    publish_cleaned(ctx, d.cleaned)  # other entries the new rule decides (scope all_containers...)
    return rule


async def decide(ctx: ApiContext, pending_id: int, action: str, body: Any, created_by: str = "api") -> dict[str, Any]:
    """Allow or deny a pending entry with a rule; 404 for an unknown id, 400 for a bad body."""
    if action not in DECISION_ACTIONS:
        raise bad_request(f"action must be one of {', '.join(DECISION_ACTIONS)}")
    scope, seconds, notes = parse_decision(body)
    now = time.time()
    expires_at = None if seconds is None else now + seconds
    try:
        d = await ctx.db(store_ops.decide_pending, pending_id, action, scope, expires_at, notes, created_by, now)
    except InvalidInput as exc:
        raise bad_request(str(exc)) from None
    if d is None:
        raise not_found(f"pending request {pending_id} not found")
    rule = _publish_decision(ctx, d, action)
    # Before answering: when the allow call returns, the held client must already be moving.
    await proxy_reload(ctx)
    if action == "deny":
        await proxy_block(ctx, d.keys, "rule")
    return {"rule": rule, "pending_removed": True}


async def dismiss(ctx: ApiContext, pending_id: int) -> bool:
    """Remove an entry (and its siblings) without a rule; its held connections are blocked."""
    keys = await ctx.db(store_ops.dismiss_pending, pending_id)
    if keys is None:
        return False
    ctx.publish(topics.PENDING_DISMISSED, {"pending_id": pending_id})
    await proxy_block(ctx, keys, "dismissed")
    return True


# Connections held per (container, port): [(host, the name they were judged under, count), ...]
Held = dict[tuple[str, int], list[tuple[str, str | None, int]]]


async def waiting_counts(ctx: ApiContext) -> Held:
    """Connections held right now, by (container, port), from every proxy process; empty when
    the proxy is down."""
    reply = await soft_call(ctx.proxy, "waiters", {}, timeout=WAITERS_TIMEOUT, retries=1)
    held: Held = {}
    for w in (reply or {}).get("waiters") or []:
        try:
            name = w.get("resolved_hostname")
            entry = (str(w["host"]), str(name) if name else None, int(w.get("count") or 0))
            held.setdefault((str(w["container_name"]), int(w["port"])), []).append(entry)
        except (AttributeError, KeyError, TypeError, ValueError):
            continue  # a malformed entry only loses its own count
    return held


def entry_waiting(row: dict[str, Any], held: Held) -> int:
    """`waiting` of a pending entry (a group of rows, `hosts` their raw hosts: list_groups): the
    connections held for one of its rows' keys, or for another host of its container and port
    whose name is the entry's (resolved-or-raw) host. Another IP of the same host bumps the entry
    rather than making a row (SPEC §3.1), so its connections are held under a key with no row."""
    group = row["resolved_hostname"] or row["destination_host"]
    hosts = row["hosts"]
    return sum(
        n
        for host, name, n in held.get((row["container_name"], int(row["destination_port"])), ())
        if host in hosts or host == group or name == group
    )


class PendingListResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        limit = int_param(req, "limit", 100, lo=1)
        offset = int_param(req, "offset", 0, hi=10**9)
        (rows, total), held = await asyncio.gather(
            self.ctx.db(
                store_ops.list_pending,
                req.get_param("container") or None,
                req.get_param("destination") or None,
                limit,
                offset,
            ),
            waiting_counts(self.ctx),
        )
        items = []
        for row in rows:
            items.append(pending_json(row, entry_waiting(row, held)))
        json_response(resp, {"items": items, "total": total})


class PendingCountResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        json_response(resp, {"count": await self.ctx.db(store_ops.pending_count)})


class PendingDecisionResource:
    def __init__(self, ctx: ApiContext, action: str) -> None:
        self.ctx = ctx
        self.action = action

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, pending_id: int) -> None:
        body = await read_json(req, default={})
        json_response(resp, await decide(self.ctx, pending_id, self.action, body))


class PendingItemResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_delete(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, pending_id: int) -> None:
        json_response(resp, {"status": "ok", "removed": await dismiss(self.ctx, pending_id)})


class PendingBulkAllowResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = await read_json(req)
        ids = id_list_field(body, "pending_ids")
        scope, seconds, notes = parse_decision(body, (*DECISION_FIELDS, "pending_ids"))
        now = time.time()
        expires_at = None if seconds is None else now + seconds
        try:
            decisions, missing = await self.ctx.db(
                store_ops.bulk_decide, ids, "allow", scope, expires_at, notes, "api", now
            )
        except InvalidInput as exc:
            raise bad_request(str(exc)) from None
        rules: dict[int, dict[str, Any]] = {}
        for d in decisions:
            rules.setdefault(d.rule["id"], _publish_decision(self.ctx, d, "allow"))
        if decisions:
            await proxy_reload(self.ctx)
        json_response(
            resp,
            {"rules_created": list(rules.values()), "pending_removed": len(ids) - len(missing), "not_found": missing},
        )


class PendingBulkDismissResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        ids = id_list_field(await read_json(req), "pending_ids")
        removed, keys, missing = await self.ctx.db(store_ops.bulk_dismiss, ids)
        for pid in removed:
            self.ctx.publish(topics.PENDING_DISMISSED, {"pending_id": pid})
        await proxy_block(self.ctx, keys, "dismissed")
        json_response(resp, {"status": "ok", "removed": len(removed), "not_found": missing})


def register(app: falcon.asgi.App, ctx: ApiContext, route: Callable[[str], str]) -> None:
    app.add_route(route("/api/pending"), PendingListResource(ctx))
    app.add_route(route("/api/pending/count"), PendingCountResource(ctx))
    app.add_route(route("/api/pending/bulk-allow"), PendingBulkAllowResource(ctx))
    app.add_route(route("/api/pending/bulk-dismiss"), PendingBulkDismissResource(ctx))
    app.add_route(route("/api/pending/{pending_id:id}"), PendingItemResource(ctx))
    app.add_route(route("/api/pending/{pending_id:id}/allow"), PendingDecisionResource(ctx, "allow"))
    app.add_route(route("/api/pending/{pending_id:id}/deny"), PendingDecisionResource(ctx, "deny"))
