"""The `http_transactions` table (migrations 2, 4, 6, 8, 9 and 14): its columns, the SQL the recorder writes it with, and
the API's listing and lookup."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..bodies import Reader
from . import sql

COLUMNS = (
    "id",
    "timestamp",
    "container_name",
    "destination_host",
    "destination_port",
    "method",
    "url",
    "request_headers",
    "request_body",
    "request_body_size",
    "request_content_type",
    "status_code",
    "response_headers",
    "response_body",
    "response_body_size",
    "response_content_type",
    "duration_ms",
    "rule_id",
    "result",
    "conversation_id",
    "substituted_credentials",
    "session_id",
    "request_host",
    "host_mismatch",
    "error",  # migration 4: the contacted host vs the Host header
    "block_reason",
    "refused_credentials",  # migration 6: why a request was refused (SPEC §12.7)
    # migration 6: how each body is stored (greyproxy.bodies); NULL codec = a TEXT body of before
    "request_body_codec",
    "request_body_charset",
    "response_body_codec",
    "response_body_charset",
    # migration 9: the base row of a body stored as a delta (greyproxy.bodies.DeltaEncoder sets it
    # after the insert; never in a journal record)
    "request_body_base",
    "response_body_base",
    # migration 14: 1 when the stored body is not the whole body (cut at capture.maxBodyBytes on the
    # wire, or its decoding stopped there), 0 when it is; NULL for rows recorded before (and sides
    # without a stored body)
    "request_body_truncated",
    "response_body_truncated",
)
_NOT_RECORDED = ("id", "request_body_base", "response_body_base")
FIELDS = tuple(c for c in COLUMNS if c not in _NOT_RECORDED)  # what a `transaction` journal record fills in
JSON_COLUMNS = (
    "request_headers",
    "response_headers",
    "substituted_credentials",
    "refused_credentials",
)  # stored as JSON text
BODY_COLUMNS = ("request_body", "response_body")  # left out of listings
BODY_META_COLUMNS = (  # how a body is stored: not part of the API's item
    "request_body_codec",
    "request_body_charset",
    "response_body_codec",
    "response_body_charset",
    "request_body_truncated",
    "response_body_truncated",
    "request_body_base",
    "response_body_base",
)

# Hand-written rather than peewee's insert_many, as for logs: one executemany per batch in the
# recorder (bench/run.py's recorder rows), where a query object per batch costs measurably more.
INSERT = f"INSERT INTO http_transactions ({', '.join(FIELDS)}) VALUES ({', '.join('?' * len(FIELDS))})"


# --------------------------------------------------------------------------- the API's queries

_LIST_COLUMNS = ", ".join(c for c in COLUMNS if c not in BODY_COLUMNS)
_ALL_COLUMNS = ", ".join(COLUMNS)


@dataclass(frozen=True)
class TransactionFilter:
    container: str | None = None
    destination: str | None = None
    method: str | None = None
    session_id: str | None = None
    conversation_id: str | None = None
    from_ts: float | None = None
    to_ts: float | None = None


def where_clause(f: TransactionFilter) -> tuple[str, list[Any]]:
    where: list[str] = ["1 = 1"]
    args: list[Any] = []
    if f.container:
        where.append("container_name LIKE ? ESCAPE '\\'")  # a substring, as everywhere (SPEC §7)
        args.append(sql.like_pattern(f.container))
    if f.destination:
        where.append("destination_host LIKE ? ESCAPE '\\'")
        args.append(sql.like_pattern(f.destination))
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


def list_transactions(
    f: TransactionFilter, limit: int, offset: int, include_bodies: bool
) -> tuple[list[dict[str, Any]], int]:
    clause, args = where_clause(f)
    cols = _ALL_COLUMNS if include_bodies else _LIST_COLUMNS
    with sql.read_transaction():  # the count and the page from one snapshot
        total = int(sql.scalar(f"SELECT COUNT(*) FROM http_transactions WHERE {clause}", args))
        rows = sql.rows(
            f"SELECT {cols} FROM http_transactions WHERE {clause} ORDER BY timestamp DESC, id DESC LIMIT ? OFFSET ?",
            [*args, limit, offset],
        )
        if include_bodies:
            # delta bodies resolved here, in the pool (greyproxy.bodies); one whose chain cannot be
            # read is left out (`<side>_body_error`), not the page
            Reader(sql.execute).inline(rows, keep_going=True)
    return rows, total


def get_transaction(tid: int) -> dict[str, Any] | None:
    with sql.read_transaction():  # the row and its bodies' delta chain from one snapshot
        row = sql.one(f"SELECT {_ALL_COLUMNS} FROM http_transactions WHERE id = ?", (tid,))
        if row is not None:
            Reader(sql.execute).inline([row], keep_going=True)
    return row


# --------------------------------------------------------------------------- maintenance (raw sqlite3 connection)

COUNT = "SELECT COUNT(*) FROM http_transactions"
HEADERS_AFTER = (
    "SELECT id, request_headers, response_headers, url FROM http_transactions WHERE id > ? ORDER BY id LIMIT ?"
)
SET_HEADERS = "UPDATE http_transactions SET request_headers = ?, response_headers = ?, url = ? WHERE id = ?"
