"""/api/transactions and /api/transactions/{id} (SPEC §7): captured HTTP transactions."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import falcon
import falcon.asgi

from greyproxy.capture import transaction_json
from greyproxy.store import database
from greyproxy.store.transactions import BODY_COLUMNS
from greyproxy.store.transactions import COLUMNS as TRANSACTION_COLUMNS

from .context import ApiContext
from .errors import bad_request, not_found
from .store_ops import like_pattern
from .util import bool_param, int_param, json_response, time_param

_LIST_COLUMNS = ", ".join(c for c in TRANSACTION_COLUMNS if c not in BODY_COLUMNS)
_ALL_COLUMNS = ", ".join(TRANSACTION_COLUMNS)


@dataclass(frozen=True)
class TransactionFilter:
    container: str | None = None
    destination: str | None = None
    method: str | None = None
    session_id: str | None = None
    conversation_id: str | None = None
    from_ts: float | None = None
    to_ts: float | None = None


def _where(f: TransactionFilter) -> tuple[str, list[Any]]:
    where: list[str] = ["1 = 1"]
    args: list[Any] = []
    if f.container:
        where.append("container_name = ?")  # exact, like /api/logs: the (container, timestamp) index serves it
        args.append(f.container)
    if f.destination:
        where.append("destination_host LIKE ? ESCAPE '\\'")
        args.append(like_pattern(f.destination))
    for col in ("method", "session_id", "conversation_id"):
        value = getattr(f, col)
        if value:
            where.append(f"{col} = ?")
            args.append(value)
    if f.from_ts is not None:
        where.append("timestamp >= ?")
        args.append(f.from_ts)
    if f.to_ts is not None:
        where.append("timestamp <= ?")
        args.append(f.to_ts)
    return " AND ".join(where), args


def _dicts(cur: Any) -> list[dict[str, Any]]:
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def list_transactions(f: TransactionFilter, limit: int, offset: int,
                      include_bodies: bool) -> tuple[list[dict[str, Any]], int]:
    clause, args = _where(f)
    cols = _ALL_COLUMNS if include_bodies else _LIST_COLUMNS
    with database.atomic():  # the count and the page from one snapshot
        total = int(database.execute_sql(f"SELECT COUNT(*) FROM http_transactions WHERE {clause}", args).fetchone()[0])
        rows = _dicts(database.execute_sql(
            f"SELECT {cols} FROM http_transactions WHERE {clause} ORDER BY timestamp DESC, id DESC LIMIT ? OFFSET ?",
            [*args, limit, offset]))
    return rows, total


def get_transaction(tid: int) -> dict[str, Any] | None:
    rows = _dicts(database.execute_sql(f"SELECT {_ALL_COLUMNS} FROM http_transactions WHERE id = ?", (tid,)))
    return rows[0] if rows else None


def _text_param(req: falcon.asgi.Request, name: str, max_len: int = 1000) -> str | None:
    value = req.get_param(name)
    if value is None or value == "":
        return None
    if len(value) > max_len:
        raise bad_request(f"{name} is longer than {max_len} characters")
    return value


class TransactionsResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        method = _text_param(req, "method", 32)
        f = TransactionFilter(
            container=_text_param(req, "container"), destination=_text_param(req, "destination"),
            method=method.upper() if method else None, session_id=_text_param(req, "session_id"),
            conversation_id=_text_param(req, "conversation_id"),
            from_ts=time_param(req, "from_date"), to_ts=time_param(req, "to_date"))
        if f.from_ts is not None and f.to_ts is not None and f.from_ts > f.to_ts:
            raise bad_request("from_date must not be after to_date")
        limit = int_param(req, "limit", 50, lo=1, hi=1000)
        offset = int_param(req, "offset", 0, hi=10**9)
        include_bodies = bool_param(req, "include_bodies")
        rows, total = await self.ctx.db(list_transactions, f, limit, offset, include_bodies)
        json_response(resp, {
            "items": [transaction_json(r, include_bodies) for r in rows],
            "total": total,
            "page": offset // limit + 1,
            "pages": max(1, math.ceil(total / limit)),
        })


class TransactionResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, tid: int) -> None:
        row = await self.ctx.db(get_transaction, tid)
        if row is None:
            raise not_found(f"transaction {tid} not found")
        json_response(resp, transaction_json(row, include_bodies=True))


def register(app: falcon.asgi.App, ctx: ApiContext, route: Callable[[str], str]) -> None:
    app.add_route(route("/api/transactions"), TransactionsResource(ctx))
    app.add_route(route("/api/transactions/{tid:id}"), TransactionResource(ctx))

