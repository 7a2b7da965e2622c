"""The `transaction` journal record kind (SPEC §7): one http_transactions row, then `transaction.new`
with the item without bodies once the batch is committed.

Headers arrive already redacted (the proxy does that before anything leaves it).
"""

from __future__ import annotations

import sqlite3
import time
from operator import itemgetter
from typing import Any

import orjson

from bus import records, topics
from greyproxy.bodies import DeltaEncoder, from_record
from greyproxy.capture import transaction_json
from greyproxy.credentials.substitute import REASONS as CREDENTIAL_REASONS
from greyproxy.store import global_credentials, sessions
from greyproxy.store import transactions as table

from .apply import Deferred, Event, Record, apply_run, register

_COLUMNS = table.FIELDS
_JSON: dict[str, Any] = {
    "request_headers": {},
    "response_headers": {},
    "substituted_credentials": [],
    "refused_credentials": [],
}
_INTS = ("destination_port", "request_body_size", "response_body_size")
_params_of = itemgetter(*_COLUMNS)
DELTAS = DeltaEncoder()  # bodies stored as deltas against their stream's earlier one (greyproxy.bodies)
# Where the JSON columns sit in a row's parameters (with the value stored for a missing one).
_JSON_AT = tuple((_COLUMNS.index(col), default) for col, default in _JSON.items())


def _row(data: dict[str, Any]) -> dict[str, Any]:
    row = {c: data.get(c) for c in _COLUMNS}
    if row["timestamp"] is None:
        row["timestamp"] = time.time()
    for col in _INTS:
        row[col] = int(row[col] or 0)
    if row["result"] is None:
        row["result"] = "allowed"
    row["host_mismatch"] = 1 if row["host_mismatch"] else 0
    from_record(row, "request")  # base64 in the record → the stored BLOB
    from_record(row, "response")
    for col in ("container_name", "destination_host", "method", "url"):
        if not isinstance(row[col], str):
            raise ValueError(f"transaction record without {col}")
    return row


def _params(row: dict[str, Any]) -> tuple:
    params = list(_params_of(row))
    for i, default in _JSON_AT:
        value = params[i]
        params[i] = orjson.dumps(value if value is not None else default).decode()
    return tuple(params)


def _payload(row: dict[str, Any], data: Any) -> dict[str, Any]:
    return transaction_json(row, include_bodies=False)


def refused_event(row: dict[str, Any]) -> Event:
    """`credential.refused` for a request the credential hook refused (SPEC §12.7), after the commit."""
    return (
        topics.CREDENTIAL_REFUSED,
        {
            "transaction_id": row["id"],
            "container_name": row["container_name"],
            "destination_host": row["destination_host"],
            "reason": row["block_reason"],
            "labels": list(row.get("refused_credentials") or []),
            "session_id": row.get("session_id"),
        },
    )


def apply_transaction(cur: sqlite3.Cursor, data: dict[str, Any], events: list[Event]) -> None:
    row = _row(data)
    cur.execute(table.INSERT, _params(row))
    row["id"] = cur.lastrowid
    DELTAS.stored(cur, row)
    events.append((topics.TRANSACTION_NEW, Deferred(_payload, row, data)))
    if row["block_reason"] in CREDENTIAL_REASONS:
        events.append(refused_event(row))


def _build(data: dict[str, Any]) -> tuple[dict[str, Any], tuple]:
    row = _row(data)
    return row, _params(row)


def apply_transaction_run(cur: sqlite3.Cursor, run: list[Record], events: list[Event]) -> None:
    start = len(events)
    apply_run(cur, run, events, "http_transactions", table.INSERT, _build, topics.TRANSACTION_NEW, _payload)
    # Refusals by the credential hook are rare: look for them only among this run's rows.
    told = {d["transaction_id"] for t, d in events[start:] if t == topics.CREDENTIAL_REFUSED}
    for topic, ev in events[start:]:
        if topic == topics.TRANSACTION_NEW and type(ev) is Deferred:
            row = ev.row
            DELTAS.stored(cur, row)  # once per row (rows applied one at a time, after a bad one, had it)
            if row.get("block_reason") in CREDENTIAL_REASONS and row["id"] not in told:
                events.append(refused_event(row))


def apply_credential_use(cur: sqlite3.Cursor, data: dict[str, Any], events: list[Event]) -> None:
    """`credential_use {session_id|null, credential_id|null, count, ts}`: requests substituted since
    the proxy's last flush; then `session.substitution` with the session id (SPEC §12.7)."""
    count, ts = int(data.get("count") or 1), float(data.get("ts") or time.time())
    sid, cid = data.get("session_id"), data.get("credential_id")
    if sid is not None:
        if cur.execute(sessions.ADD_USE, (count, ts, str(sid))).rowcount:
            events.append((topics.SESSION_SUBSTITUTION, str(sid)))
    elif cid is not None:
        cur.execute(global_credentials.ADD_USE, (count, ts, str(cid)))


register(records.TRANSACTION, apply_transaction, apply_transaction_run)
register(records.CREDENTIAL_USE, apply_credential_use)
