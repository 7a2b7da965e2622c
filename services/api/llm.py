"""LLM conversation tracking REST (SPEC §13.4, §13.6, §13.7): /api/dissectors, /api/endpoint-rules,
/api/conversations, and POST /api/maintenance/rebuild-conversations.

Reads only: the maintenance process writes conversations (services/maintenance/assembler.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import falcon
import falcon.asgi
import orjson

from greyproxy.llm import dissect as D
from greyproxy.llm import rules as R
from greyproxy.llm import stored
from greyproxy.store import database
from greyproxy.timeutil import rfc3339

from .context import ApiContext
from .errors import ApiError, bad_request
from .settings import current_settings
from .util import int_param, json_response, read_json, time_param

RULE_COLUMNS = "id, host_pattern, path_pattern, method, decoder_name, priority, enabled, user_defined"
MAX_LIMIT = 500


def _rule_json(row: tuple) -> dict[str, Any]:
    rid, host, path, method, decoder, priority, enabled, user = row
    return {
        "id": rid,
        "host_pattern": host,
        "path_pattern": path,
        "method": method,
        "decoder_name": decoder,
        "priority": priority,
        "enabled": bool(enabled),
        "user_defined": bool(user),
    }


def list_rules() -> list[dict[str, Any]]:
    return R.ordered([_rule_json(r) for r in database.execute_sql(f"SELECT {RULE_COLUMNS} FROM endpoint_rules")])


def _duplicate(fields: dict[str, Any], exclude: int | None) -> bool:
    row = database.execute_sql(
        "SELECT 1 FROM endpoint_rules WHERE user_defined = 1 AND host_pattern = ? AND path_pattern = ? AND method = ?"
        " AND id != ?",
        (fields["host_pattern"], fields["path_pattern"], fields["method"], exclude or 0),
    ).fetchone()
    return row is not None


def create_rule(fields: dict[str, Any]) -> dict[str, Any] | None:
    with database.atomic("IMMEDIATE"):
        if _duplicate(fields, None):
            return None
        cur = database.execute_sql(
            "INSERT INTO endpoint_rules (host_pattern, path_pattern, method, decoder_name, priority, enabled,"
            " user_defined, created_at) VALUES (?, ?, ?, ?, ?, ?, 1, ?)",
            (
                fields["host_pattern"],
                fields["path_pattern"],
                fields["method"],
                fields["decoder_name"],
                fields["priority"],
                int(fields["enabled"]),
                time.time(),
            ),
        )
        rid = cur.lastrowid
    return _rule_json(
        database.execute_sql(f"SELECT {RULE_COLUMNS} FROM endpoint_rules WHERE id = ?", (rid,)).fetchone()
    )


def _existing(rid: int) -> tuple | None:
    return database.execute_sql("SELECT user_defined FROM endpoint_rules WHERE id = ?", (rid,)).fetchone()


def update_rule(rid: int, fields: dict[str, Any]) -> str:
    with database.atomic("IMMEDIATE"):
        row = _existing(rid)
        if row is None:
            return "missing"
        if not row[0]:
            return "builtin"
        if _duplicate(fields, rid):
            return "duplicate"
        database.execute_sql(
            "UPDATE endpoint_rules SET host_pattern = ?, path_pattern = ?, method = ?, decoder_name = ?, priority = ?,"
            " enabled = ? WHERE id = ?",
            (
                fields["host_pattern"],
                fields["path_pattern"],
                fields["method"],
                fields["decoder_name"],
                fields["priority"],
                int(fields["enabled"]),
                rid,
            ),
        )
    return "ok"


def delete_rule(rid: int) -> str:
    with database.atomic("IMMEDIATE"):
        row = _existing(rid)
        if row is None:
            return "missing"
        if not row[0]:
            return "builtin"
        database.execute_sql("DELETE FROM endpoint_rules WHERE id = ?", (rid,))
    return "ok"


def _fields(body: dict[str, Any]) -> dict[str, Any]:
    try:
        return R.validate(body)
    except R.RuleError as exc:
        raise bad_request(str(exc)) from None


class DissectorsResource:
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        json_response(resp, {"dissectors": [{"name": d.name, "description": d.description} for d in D.DISSECTORS]})


class EndpointRulesResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        json_response(resp, {"rules": await self.ctx.db(list_rules)})

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        fields = _fields(await read_json(req))
        rule = await self.ctx.db(create_rule, fields)
        if rule is None:
            raise ApiError(409, "a user rule with the same host_pattern, path_pattern and method exists")
        json_response(resp, rule, status=201)


class EndpointRuleResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_put(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, rid: int) -> None:
        body = await read_json(req)
        if await self.ctx.db(_existing, rid) is None:
            raise ApiError(404, "rule not found")
        outcome = await self.ctx.db(update_rule, rid, _fields(body))
        self._answer(resp, outcome, "modify")

    async def on_delete(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, rid: int) -> None:
        self._answer(resp, await self.ctx.db(delete_rule, rid), "delete")

    @staticmethod
    def _answer(resp: falcon.asgi.Response, outcome: str, verb: str) -> None:
        if outcome == "missing":
            raise ApiError(404, "rule not found")
        if outcome == "builtin":
            raise ApiError(400, f"cannot {verb} built-in rule")
        if outcome == "duplicate":
            raise ApiError(409, "a user rule with the same host_pattern, path_pattern and method exists")
        json_response(resp, {"ok": True})


# ------------------------------------------------------------------ conversations


def _detail(row: tuple) -> dict[str, Any]:
    data, updated = row
    conv = stored.load_conversation(data)
    conv["updated_at"] = rfc3339(updated)
    return conv


def _listed(row: tuple) -> dict[str, Any]:
    """The list form: `item` (migration 13), or for a row written before it, the detail cut down."""
    item, data, updated = row
    if item is None:
        conv = stored.load_conversation(data)
        for key in ("system_prompt", "turns", "messages"):
            conv.pop(key, None)
    else:
        conv = orjson.loads(item)
    conv["updated_at"] = rfc3339(updated)
    return conv


def list_conversations(filters: dict[str, Any], limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
    where, args = ["parent_conversation_id IS NULL"], []
    for key, col in (
        ("container", "container_name"),
        ("model", "model"),
        ("provider", "provider"),
        ("client", "client_name"),
    ):
        if filters.get(key):
            where.append(f"{col} = ?")
            args.append(filters[key])
    if filters.get("from") is not None:
        where.append("ended_at >= ?")
        args.append(filters["from"])
    if filters.get("to") is not None:
        where.append("ended_at <= ?")
        args.append(filters["to"])
    clause = " AND ".join(where)
    with database.atomic():
        total = int(database.execute_sql(f"SELECT COUNT(*) FROM conversations WHERE {clause}", args).fetchone()[0])
        rows = database.execute_sql(
            f"SELECT item, data, updated_at FROM conversations WHERE {clause} ORDER BY ended_at DESC, id LIMIT ? OFFSET ?",
            [*args, limit, offset],
        ).fetchall()
    return [_listed(r) for r in rows], total


def get_conversation(cid: str) -> dict[str, Any] | None:
    row = database.execute_sql("SELECT data, updated_at FROM conversations WHERE id = ?", (cid,)).fetchone()
    return _detail(row) if row else None


def list_subagents(cid: str) -> tuple[list[dict[str, Any]], int] | None:
    if database.execute_sql("SELECT 1 FROM conversations WHERE id = ?", (cid,)).fetchone() is None:
        return None
    rows = database.execute_sql(
        "SELECT item, data, updated_at FROM conversations WHERE parent_conversation_id = ? ORDER BY started_at, id",
        (cid,),
    ).fetchall()
    return [_listed(r) for r in rows], len(rows)


def _text(req: falcon.asgi.Request, name: str) -> str | None:
    value = req.get_param(name)
    if value is None or value == "":
        return None
    if len(value) > 1000:
        raise bad_request(f"{name} is longer than 1000 characters")
    return value


class ConversationsResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        filters: dict[str, str | float | None] = {
            k: _text(req, k) for k in ("container", "model", "provider", "client")
        }
        since, until = time_param(req, "from_date"), time_param(req, "to_date")
        filters["from"], filters["to"] = since, until
        if since is not None and until is not None and since > until:
            raise bad_request("from_date must not be after to_date")
        limit = int_param(req, "limit", 50, lo=1, hi=MAX_LIMIT)
        offset = int_param(req, "offset", 0, hi=10**9)
        items, total = await self.ctx.db(list_conversations, filters, limit, offset)
        json_response(resp, {"items": items, "total": total})


class ConversationResource:
    """`/api/conversations/<id>`, the id raw or `%2F`-encoded (it may hold `/`); a final
    `/subagents` segment is the sub-resource."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, cid: str) -> None:
        if len(cid) > 2000:
            raise ApiError(404, "not found")
        conv = await self.ctx.db(get_conversation, cid)
        if conv is not None:
            json_response(resp, conv)
            return
        if cid.endswith("/subagents"):
            found = await self.ctx.db(list_subagents, cid[: -len("/subagents")])
            if found is not None:
                json_response(resp, {"items": found[0], "total": found[1]})
                return
        raise ApiError(404, "not found")


def transaction_llm(tid: int) -> dict[str, Any] | None:
    """`llm` of GET /api/transactions/:id (SPEC §13.6)."""
    try:
        row = database.execute_sql(
            "SELECT dissector, provider, model, session_key, session, stop_reason, usage, extraction, extraction_form"
            " FROM llm_requests WHERE transaction_id = ?",
            (tid,),
        ).fetchone()
    except Exception:  # noqa: BLE001 - a store without the table (older schema) has no extraction
        return None
    if row is None:
        return None
    dissector, provider, model, key, session, stop, usage, extraction, form = row
    ex = stored.load(extraction, form)  # a thin one keeps the response
    if key is None and not session.startswith("inferred_"):
        key = session  # a WebSocket response frame (its request's key), or a request joined to a keyed session
    return {
        "dissector": dissector,
        "provider": provider,
        "model": model,
        "session_key": key,
        "stop_reason": stop,
        "usage": orjson.loads(usage),
        "response": ex.get("response"),
    }


class RebuildResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if not (await current_settings(self.ctx)).get("conversationsEnabled", True):
            raise ApiError(409, "conversation tracking is disabled")
        await self.ctx.maintenance.call("job.start", {"job": "rebuild-conversations"})  # 409 while it runs
        json_response(resp, {"status": "started", "job": "rebuild-conversations"}, status=202)


def conversations_status(enabled: bool) -> dict[str, Any]:
    """`conversations` of GET /api/maintenance/status (SPEC §13.7)."""
    try:
        row = database.execute_sql("SELECT value FROM meta WHERE key = 'conversations_cursor'").fetchone()
    except Exception:  # noqa: BLE001
        row = None
    cursor = int(row[0]) if row else 0
    backlog = int(database.execute_sql("SELECT COUNT(*) FROM http_transactions WHERE id > ?", (cursor,)).fetchone()[0])
    return {"enabled": enabled, "last_processed_id": cursor, "backlog": backlog}


def register(app: falcon.asgi.App, ctx: ApiContext, route: Callable[[str], str]) -> None:
    app.add_route(route("/api/dissectors"), DissectorsResource())
    app.add_route(route("/api/endpoint-rules"), EndpointRulesResource(ctx))
    app.add_route(route("/api/endpoint-rules/{rid:id}"), EndpointRuleResource(ctx))
    app.add_route(route("/api/conversations"), ConversationsResource(ctx))
    app.add_route(route("/api/conversations/{cid:path}"), ConversationResource(ctx))
    app.add_route(route("/api/maintenance/rebuild-conversations"), RebuildResource(ctx))
