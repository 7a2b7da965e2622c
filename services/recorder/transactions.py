"""The `transaction` journal record kind (SPEC §7): one http_transactions row, then `transaction.new`
with the item without bodies once the batch is committed.

Headers arrive already redacted (the proxy does that before anything leaves it).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import orjson

from bus import topics
from greyproxy.capture import TRANSACTION_COLUMNS, transaction_json

from .apply import Event, Record, apply_each, insert_run, register

_COLUMNS = tuple(c for c in TRANSACTION_COLUMNS if c != "id")
_INSERT = f"INSERT INTO http_transactions ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_JSON = {"request_headers": {}, "response_headers": {}, "substituted_credentials": []}
_INTS = ("destination_port", "request_body_size", "response_body_size")


def _row(data: dict[str, Any]) -> dict[str, Any]:
    row = {c: data.get(c) for c in _COLUMNS}
    if row["timestamp"] is None:
        row["timestamp"] = time.time()
    for col in _INTS:
        row[col] = int(row[col] or 0)
    if row["result"] is None:
        row["result"] = "allowed"
    for col in ("container_name", "destination_host", "method", "url"):
        if not isinstance(row[col], str):
            raise ValueError(f"transaction record without {col}")
    return row


def _params(row: dict[str, Any]) -> tuple:
    stored = dict(row)
    for col, default in _JSON.items():
        stored[col] = orjson.dumps(row[col] if row[col] is not None else default).decode()
    return tuple(stored[c] for c in _COLUMNS)


def apply_transaction(cur: sqlite3.Cursor, data: dict[str, Any], events: list[Event]) -> None:
    row = _row(data)
    cur.execute(_INSERT, _params(row))
    row["id"] = cur.lastrowid
    events.append((topics.TRANSACTION_NEW, transaction_json(row, include_bodies=False)))


def apply_transaction_run(cur: sqlite3.Cursor, run: list[Record], events: list[Event]) -> None:
    """A batch's transaction records in one executemany (one per proxied request, so there are many);
    any bad record: the run is undone and applied one at a time, so only the bad one is dropped."""
    try:
        rows = [_row(data) for _rid, _kind, data in run]
        params = [_params(row) for row in rows]
    except (AttributeError, KeyError, TypeError, ValueError, orjson.JSONEncodeError):
        apply_each(cur, run, events)
        return
    cur.execute("SAVEPOINT txrun")
    try:
        ids = insert_run(cur, "http_transactions", _INSERT, params)
        cur.execute("RELEASE txrun")
    except (TypeError, ValueError, OverflowError, sqlite3.IntegrityError, sqlite3.InterfaceError):
        cur.execute("ROLLBACK TO txrun")
        cur.execute("RELEASE txrun")
        apply_each(cur, run, events)
        return
    for row, rid in zip(rows, ids):
        row["id"] = rid
        events.append((topics.TRANSACTION_NEW, transaction_json(row, include_bodies=False)))


register("transaction", apply_transaction, apply_transaction_run)
