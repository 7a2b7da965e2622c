"""GET /api/transactions/export.har (SPEC §14): the list's filters, every match, as HAR 1.2, streamed.

The rows are read oldest first in keyset pages (timestamp, id) in the database pool, each page
turned into its bytes there too; the event loop only forwards them. Bodies are read in groups
of at most BODY_BATCH_BYTES (by their stored length), so 100 000 transactions, or a page of
2 MiB bodies, export in bounded memory.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import falcon
import falcon.asgi

from greyproxy import har
from greyproxy.bodies import Reader
from greyproxy.capture import DEFAULT_MAX_BODY, TRANSACTION_COLUMNS
from greyproxy.store import database
from greyproxy.store.transactions import TransactionFilter, where_clause

from .context import ApiContext
from .transactions import filter_from
from .util import int_param

log = logging.getLogger("greyproxy.api")

EXPORT_PATH = "/api/transactions/export.har"
PAGE_ROWS = 500
BODY_BATCH_BYTES = 8 * 1024 * 1024
_META = [c for c in TRANSACTION_COLUMNS if c not in ("request_body", "response_body")]
_META_SQL = ", ".join(_META) + ", COALESCE(length(request_body), 0) + COALESCE(length(response_body), 0)"

Key = tuple[float, int]  # (timestamp, id) of the last row sent


def _bodies(ids: list[int]) -> dict[int, tuple[Any, Any]]:
    """The stored bodies (greyproxy.bodies: read with the codec and charset columns of the row)."""
    marks = ",".join("?" * len(ids))
    cur = database.execute_sql(
        f"SELECT id, request_body, response_body FROM http_transactions WHERE id IN ({marks})", ids
    )
    return {row[0]: (row[1], row[2]) for row in cur.fetchall()}


def export_page(
    f: TransactionFilter,
    after: Key | None,
    rows: int = PAGE_ROWS,
    batch_bytes: int = BODY_BATCH_BYTES,
    skip: int = 0,
    max_body: int = DEFAULT_MAX_BODY,
) -> tuple[list[bytes], Key | None]:
    """The next page's entries (HAR JSON each) after `after` (the first page: after `skip` matches),
    and the key to continue from (None: done)."""
    clause, args = where_clause(f)
    if after is not None:
        clause += " AND (timestamp > ? OR (timestamp = ? AND id > ?))"
        args = [*args, after[0], after[0], after[1]]
    cur = database.execute_sql(
        f"SELECT {_META_SQL} FROM http_transactions WHERE {clause} ORDER BY timestamp, id LIMIT ? OFFSET ?",
        [*args, rows, skip if after is None else 0],
    )
    meta = cur.fetchall()
    if not meta:
        return [], None
    out: list[bytes] = []
    reader = Reader(database.execute_sql)  # delta bodies (greyproxy.bodies): a chain's frames decoded once
    i = 0
    while i < len(meta):
        j, size = i, 0
        while j < len(meta) and (j == i or size + meta[j][-1] <= batch_bytes):
            size += meta[j][-1]
            j += 1
        group = meta[i:j]
        bodies = _bodies([r[0] for r in group if r[-1]])
        for r in group:
            row = dict(zip(_META, r))
            row["request_body"], row["response_body"] = bodies.get(row["id"], (None, None))
            out.append(har.entry_bytes(reader.inline([row])[0], max_body))
        i = j
    last = meta[-1]
    key = (last[_META.index("timestamp")], last[0])
    # Every pool thread's connection keeps its own page cache (up to cache_size): let the pages an
    # export has streamed through go, so its memory stays one page's whatever thread runs it.
    database.execute_sql("PRAGMA shrink_memory")
    return out, (key if len(meta) == rows else None)


async def har_stream(
    ctx: ApiContext, f: TransactionFilter, limit: int | None = None, offset: int = 0
) -> AsyncIterator[bytes]:
    """Every match (oldest first), or `limit` of them after the first `offset`."""
    max_body = int(ctx.cfg.section("capture").get("maxBodyBytes") or DEFAULT_MAX_BODY)
    yield har.document_head("exported by greyproxy")
    after: Key | None = None
    first = True
    left = limit
    while True:
        rows = PAGE_ROWS if left is None else min(PAGE_ROWS, left)
        if rows <= 0:
            break
        try:
            entries, after = await ctx.db(export_page, f, after, rows, BODY_BATCH_BYTES, offset, max_body)
        except Exception:
            # The status line has gone out: the client sees a cut-off document (invalid JSON).
            log.exception("HAR export failed after it started")
            return
        if entries:
            chunk = b",".join(entries)
            yield chunk if first else b"," + chunk
            first = False
            if left is not None:
                left -= len(entries)
        if after is None:
            break
    yield har.DOCUMENT_TAIL


class HarExportResource:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        f = filter_from(req)
        # (no limit: every match, as SPEC §14 says; one given is checked as the list checks it)
        limit = int_param(req, "limit", 0, lo=1, hi=10**9) or None
        offset = int_param(req, "offset", 0, hi=10**9)
        resp.content_type = "application/json"
        resp.set_header("Content-Disposition", 'attachment; filename="greyproxy.har"')
        resp.set_header("Cache-Control", "no-store")
        resp.stream = har_stream(self.ctx, f, limit, offset)


def register(app: falcon.asgi.App, ctx: ApiContext, route: Callable[[str], str]) -> None:
    app.add_route(route(EXPORT_PATH), HarExportResource(ctx))


__all__ = ["EXPORT_PATH", "HarExportResource", "export_page", "har_stream"]
