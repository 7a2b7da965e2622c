"""The `redact-headers` job (SPEC §10): re-apply the current redaction (header names, and query
parameters in the URL and in Location/Content-Location/Referer) to every stored transaction, in
short batches so the recorder's writes interleave. Bodies are left as captured."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import orjson

from greyproxy.redaction import Redactor, extra_patterns
from greyproxy.store import settings as settings_table
from greyproxy.store import transactions as transactions_table

from .jobs import register

BATCH = 500
PAUSE = 0.01  # seconds between batches: the write lock is free for the recorder in between


def _current_redactor(conn: sqlite3.Connection) -> Redactor:
    row = conn.execute(settings_table.GET_RAW, ("redactedHeaders",)).fetchone()
    extras: Any = None
    if row is not None:
        try:
            extras = orjson.loads(row[0])
        except orjson.JSONDecodeError:
            extras = None
    return Redactor(extra_patterns(extras))


def _redacted(redactor: Redactor, raw: str | None) -> str | None:
    """The stored JSON re-redacted, or None when nothing changes (or it does not parse)."""
    if not raw:
        return None
    try:
        headers = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(headers, dict):
        return None
    new, changed = redactor.redact_map(headers)
    return orjson.dumps(new).decode() if changed else None


def redact_headers(conn: sqlite3.Connection, opts: dict[str, Any]) -> Iterator[tuple[int, int]]:
    redactor = _current_redactor(conn)
    batch = int(opts.get("batch_size") or BATCH)
    pause = float(opts.get("pause", PAUSE))
    total = int(conn.execute(transactions_table.COUNT).fetchone()[0])
    processed, last_id = 0, 0
    yield 0, total
    while True:
        # Reads need no lock (WAL); only the rows that change are written, in one short transaction.
        rows = conn.execute(transactions_table.HEADERS_AFTER, (last_id, batch)).fetchall()
        if not rows:
            break
        updates = []
        for tid, req_h, resp_h, url in rows:
            new_req, new_resp = _redacted(redactor, req_h), _redacted(redactor, resp_h)
            new_url = redactor.url(url) if isinstance(url, str) else url
            if new_req is not None or new_resp is not None or new_url != url:
                updates.append((new_req or req_h, new_resp or resp_h, new_url, tid))
        if updates:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(transactions_table.SET_HEADERS, updates)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        processed += len(rows)
        last_id = rows[-1][0]
        yield processed, max(total, processed)  # rows recorded meanwhile are covered too
        time.sleep(pause)


register("redact-headers", redact_headers)
