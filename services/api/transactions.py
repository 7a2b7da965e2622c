"""/api/transactions and /api/transactions/{id} (SPEC §7): captured HTTP transactions."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import falcon
import falcon.asgi

from greyproxy.bodies import READ_ERRORS, readable_side
from greyproxy.capture import transaction_json
from greyproxy.store.transactions import TransactionFilter, get_transaction, list_transactions

from .context import ApiContext
from .errors import bad_request, not_found
from .llm import transaction_llm
from .util import bool_param, int_param, json_response, time_param


def _text_param(req: falcon.asgi.Request, name: str, max_len: int = 1000) -> str | None:
    value = req.get_param(name)
    if value is None or value == "":
        return None
    if len(value) > max_len:
        raise bad_request(f"{name} is longer than {max_len} characters")
    return value


def filter_from(req: falcon.asgi.Request) -> TransactionFilter:
    """The list's filters from the query (shared by the list and the HAR export)."""
    method = _text_param(req, "method", 32)
    f = TransactionFilter(
        container=_text_param(req, "container"),
        destination=_text_param(req, "destination"),
        method=method.upper() if method else None,
        session_id=_text_param(req, "session_id"),
        conversation_id=_text_param(req, "conversation_id"),
        from_ts=time_param(req, "from_date"),
        to_ts=time_param(req, "to_date"),
    )
    if f.from_ts is not None and f.to_ts is not None and f.from_ts > f.to_ts:
        raise bad_request("from_date must not be after to_date")
    return f


log = logging.getLogger("greyproxy.api")
_SIDES = ("request", "response")


def transaction_item(row: dict[str, Any], include_bodies: bool) -> dict[str, Any]:
    """The SPEC §7 item of a stored row. A stored body that cannot be read (corrupt, an unknown
    codec, a broken delta chain) is null with `<side>_body_error` saying why, and logged: the rest
    of the item, and of the page, is there (was: a 500 for the whole page)."""
    if not include_bodies:
        return transaction_json(row, False)
    if not any(f"{side}_body_error" in row for side in _SIDES):
        try:
            return transaction_json(row, True)
        except READ_ERRORS:
            pass  # which body: below (a rare row; the others are read once)
    errors: dict[str, str] = {}
    for side in _SIDES:
        error = row.get(f"{side}_body_error")  # (set by the store for a delta chain it could not read)
        if error is None:
            _stored, error = readable_side(row, side)
        if error is not None:
            log.warning("transaction %s: its stored %s body could not be read: %s", row.get("id"), side, error)
            row[f"{side}_body"] = None
            errors[side] = error
    item = transaction_json(row, True)
    for side, error in errors.items():
        item[f"{side}_body_error"] = f"the stored body could not be read: {error}"
    return item


class TransactionsResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        f = filter_from(req)
        limit = int_param(req, "limit", 50, lo=1, hi=1000)
        offset = int_param(req, "offset", 0, hi=10**9)
        include_bodies = bool_param(req, "include_bodies")
        rows, total = await self.ctx.db(list_transactions, f, limit, offset, include_bodies)
        json_response(
            resp,
            {
                "items": [transaction_item(r, include_bodies) for r in rows],
                "total": total,
                "page": offset // limit + 1,
                "pages": max(1, math.ceil(total / limit)),
            },
        )


class TransactionResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, tid: int) -> None:
        row = await self.ctx.db(get_transaction, tid)
        if row is None:
            raise not_found(f"transaction {tid} not found")
        # SPEC §13.6: `llm`, the dissector's view of it, or null.
        json_response(
            resp, transaction_item(row, include_bodies=True) | {"llm": await self.ctx.db(transaction_llm, tid)}
        )


def register(app: falcon.asgi.App, ctx: ApiContext, route: Callable[[str], str]) -> None:
    app.add_route(route("/api/transactions"), TransactionsResource(ctx))
    app.add_route(route("/api/transactions/{tid:id}"), TransactionResource(ctx))
