"""GET /api/transactions/export.har (SPEC §14): the list's filters, every match, as HAR 1.2, streamed.

Memory: O(one body + a small buffer) whatever the data. The rows are read oldest first in keyset
pages (timestamp, id) of their columns without bodies (PAGE_ROWS); bodies in groups of at most
BODY_BATCH_BYTES *stored* bytes, each decoded only when its entry is built, one entry at a time
(`HarRows`, driven from the database pool: peewee never runs on the event loop). A stored body
highly compressed (2 MiB of JSON in 300 bytes) is thus never held with others decoded. The event
loop hands the entries on in pieces of at most CHUNK_BYTES, one step ahead of what the client has
taken (the server's send waits while its buffer is full).

A client that goes away stops the export at its next step (ASGI `http.disconnect`, watched beside
the stream: uvicorn's send does nothing once the client is gone). A failure after the status line
went out (a database error) raises out of the stream, so the server drops the connection without
the chunked body's last chunk: the client sees an incomplete transfer, never a clean end of half
a document. A stored body that cannot be read is not a failure: its entry says so (greyproxy.har).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
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
PAGE_ROWS = 500  # rows read at once, without their bodies
BODY_BATCH_BYTES = 4 * 1024 * 1024  # stored body bytes read at once (decoded one entry at a time)
CHUNK_BYTES = 256 * 1024  # entries handed to the event loop at once (a bigger one alone)
READER_CACHE_BYTES = 8 * 1024 * 1024  # delta chains' bodies kept decoded (greyproxy.bodies.Reader)
_META = [c for c in TRANSACTION_COLUMNS if c not in ("request_body", "response_body")]
_META_SQL = ", ".join(_META) + ", COALESCE(length(request_body), 0) + COALESCE(length(response_body), 0)"
_TS = _META.index("timestamp")

Key = tuple[float, int]  # (timestamp, id) of the last row read
Receive = Callable[[], Awaitable[dict[str, Any]]]  # the ASGI receive callable


class ExportAborted(Exception):
    """The export failed after its first bytes went out: raised out of the stream so that the
    server drops the connection (an incomplete transfer) rather than ending it cleanly."""


class HarRows:
    """The entries of an export, read in steps (`next_chunk`), each run in the database pool.

    Holds at most one page of rows without bodies, one group of stored bodies (BODY_BATCH_BYTES, or
    one row's when bigger) and the entries of one chunk (small ones up to about CHUNK_BYTES, or one
    big one alone); a body is decoded when its entry is built.
    """

    def __init__(
        self,
        f: TransactionFilter,
        limit: int | None = None,
        offset: int = 0,
        max_body: int = DEFAULT_MAX_BODY,
        page_rows: int | None = None,
        batch_bytes: int | None = None,
    ) -> None:
        self.clause, self.args = where_clause(f)
        self.left = limit
        self.skip = offset
        self.max_body = max_body
        self.page_rows = page_rows or PAGE_ROWS
        self.batch_bytes = batch_bytes or BODY_BATCH_BYTES
        self.after: Key | None = None
        self.page: list[Any] = []  # the current page's rows (each None once its entry is built)
        self.pos = 0  # the next row of the page
        self.bodies: dict[int, tuple[Any, Any]] = {}  # stored bodies of page[pos:loaded]
        self.loaded = 0
        self.last_page = False
        self.entries = 0  # entries built so far
        self.held: bytes | None = None  # a big entry built after a chunk's small ones, sent next
        self.reader = Reader(database.execute_sql, READER_CACHE_BYTES)

    def _read_page(self) -> None:
        rows = self.page_rows if self.left is None else min(self.page_rows, self.left)
        self.page, self.pos, self.loaded, self.bodies = [], 0, 0, {}
        if rows <= 0:
            self.last_page = True
            return
        clause, args = self.clause, self.args
        if self.after is not None:
            clause += " AND (timestamp > ? OR (timestamp = ? AND id > ?))"
            args = [*args, self.after[0], self.after[0], self.after[1]]
        cur = database.execute_sql(
            f"SELECT {_META_SQL} FROM http_transactions WHERE {clause} ORDER BY timestamp, id LIMIT ? OFFSET ?",
            [*args, rows, self.skip if self.after is None else 0],
        )
        self.page = cur.fetchall()
        if len(self.page) < rows:
            self.last_page = True
        if self.page:
            last = self.page[-1]
            self.after = (last[_TS], last[0])
        # Every pool thread's connection keeps its own page cache (up to cache_size): let the pages
        # an export has streamed through go, so its memory stays one page's whatever thread runs it.
        database.execute_sql("PRAGMA shrink_memory")

    def _read_bodies(self) -> None:
        """The stored bodies of the next rows, up to batch_bytes of them (at least one row's)."""
        j, size = self.pos, 0
        while j < len(self.page) and (j == self.pos or size + self.page[j][-1] <= self.batch_bytes):
            size += self.page[j][-1]
            j += 1
        ids = [r[0] for r in self.page[self.pos : j] if r[-1]]
        self.bodies = {}
        if ids:
            marks = ",".join("?" * len(ids))
            cur = database.execute_sql(
                f"SELECT id, request_body, response_body FROM http_transactions WHERE id IN ({marks})", ids
            )
            self.bodies = {r[0]: (r[1], r[2]) for r in cur.fetchall()}
        self.loaded = j

    def _next_row(self) -> dict[str, Any] | None:
        if self.pos >= len(self.page):
            if self.last_page:
                return None
            self._read_page()
            if not self.page:
                return None
        if self.pos >= self.loaded:
            self._read_bodies()
        meta = self.page[self.pos]
        self.page[self.pos] = None  # (let its headers go with its entry)
        self.pos += 1
        if self.left is not None:
            self.left -= 1
        row = dict(zip(_META, meta))
        row["request_body"], row["response_body"] = self.bodies.pop(row["id"], (None, None))
        return row

    def next_chunk(self, max_bytes: int | None = None) -> list[bytes]:
        """The next entries (HAR JSON each), about `max_bytes` (CHUNK_BYTES) of them (one alone when
        bigger); [] when there are no more. Runs in the database pool."""
        max_bytes = max_bytes or CHUNK_BYTES
        if self.held is not None:  # a big entry built last time: alone
            out, self.held = [self.held], None
            return out
        out = []
        size = 0
        while size < max_bytes:
            row = self._next_row()
            if row is None:
                break
            data = har.entry_bytes(row, self.max_body, self.reader)
            del row  # (its stored bodies)
            self.entries += 1
            if out and len(data) > max_bytes:
                self.held = data  # a big entry goes alone: never joined to (copied with) small ones
                break
            out.append(data)
            size += len(data)
        return out


async def _watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    """Set `gone` when the client goes away (ASGI: `receive()` gives `http.disconnect`)."""
    try:
        while (await receive()).get("type") != "http.disconnect":
            pass
    except Exception:  # (a server that cannot say: the export runs to its end)
        log.debug("HAR export: cannot watch for the client's disconnect", exc_info=True)
        return
    gone.set()


async def har_stream(
    ctx: ApiContext,
    f: TransactionFilter,
    limit: int | None = None,
    offset: int = 0,
    receive: Receive | None = None,
) -> AsyncIterator[bytes]:
    """Every match (oldest first), or `limit` of them after the first `offset`. `receive`: the
    request's ASGI receive, watched for the client's disconnect (the export then stops)."""
    max_body = int(ctx.cfg.section("capture").get("maxBodyBytes") or DEFAULT_MAX_BODY)
    rows = HarRows(f, limit, offset, max_body)
    gone = asyncio.Event()
    watcher = asyncio.create_task(_watch_disconnect(receive, gone)) if receive is not None else None
    try:
        yield har.document_head("exported by greyproxy")
        sep = b""
        while True:
            if gone.is_set():
                log.info("HAR export stopped after %d entries: the client went away", rows.entries)
                return
            try:
                chunk = await ctx.db(rows.next_chunk)
            except Exception as exc:
                log.exception("HAR export failed after %d entries (the response is cut off)", rows.entries)
                # (its cause is logged just above: the server's own log line of this one stays short)
                raise ExportAborted(f"HAR export failed after {rows.entries} entries: {exc}") from None
            if not chunk:
                break
            if len(chunk) > 1:
                chunk = [sep + b",".join(chunk)]  # small entries: one piece of about CHUNK_BYTES
            elif sep:
                chunk = [sep, chunk[0]]  # an entry alone (maybe big): not copied to put a comma before it
            sep = b","
            for piece in chunk:
                yield piece
            del chunk, piece
        yield har.DOCUMENT_TAIL
    finally:
        if watcher is not None:
            watcher.cancel()


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
        # (Falcon has no public way to the request's ASGI receive; without it the export cannot
        # tell that its client left, and runs to its end as before)
        resp.stream = har_stream(self.ctx, f, limit, offset, getattr(req, "_receive", None))


def register(app: falcon.asgi.App, ctx: ApiContext, route: Callable[[str], str]) -> None:
    app.add_route(route(EXPORT_PATH), HarExportResource(ctx))


__all__ = ["EXPORT_PATH", "ExportAborted", "HarExportResource", "HarRows", "har_stream"]
