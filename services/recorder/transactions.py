"""The `transaction` journal record kind (SPEC §7): one http_transactions row, then `transaction.new`
with the item without bodies once the batch is committed.

Headers arrive already redacted (the proxy does that before anything leaves it).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import orjson

from bus import records, topics
from greyproxy.bodies import DeltaEncoder, from_record
from greyproxy.capture import transaction_json
from greyproxy.credentials.reasons import REASONS as CREDENTIAL_REASONS
from greyproxy.store import global_credentials, sessions
from greyproxy.store import transactions as table

from .apply import Deferred, Event, Record, Row, Rows, apply_run, register

_COLUMNS = table.FIELDS
_AT = {c: i for i, c in enumerate(_COLUMNS)}
_JSON_AT = (  # where the JSON columns sit in a row's values, with the value stored for a missing one
    (_AT["request_headers"], b"{}"),
    (_AT["response_headers"], b"{}"),
    (_AT["substituted_credentials"], b"[]"),
    (_AT["refused_credentials"], b"[]"),
)
_TEXT_AT = tuple(_AT[c] for c in ("container_name", "destination_host", "method", "url"))
_TS, _RESULT, _MISMATCH, _BLOCK = _AT["timestamp"], _AT["result"], _AT["host_mismatch"], _AT["block_reason"]
_dumps = orjson.dumps
DELTAS = DeltaEncoder()  # bodies stored as deltas against their stream's earlier one (greyproxy.bodies)
# What DeltaEncoder.stored takes from a row's values: its stream, each side's body and codec.
_CONTAINER, _METHOD, _URL = _AT["container_name"], _AT["method"], _AT["url"]
_REQ_BODY, _REQ_CODEC = _AT["request_body"], _AT["request_body_codec"]
_RESP_BODY, _RESP_CODEC = _AT["response_body"], _AT["response_body_codec"]
# The places `_params` looks at one by one (C integers when compiled: transactions.pxd).
_PORT, _HOST = _AT["destination_port"], _AT["destination_host"]
_REQ_SIZE, _RESP_SIZE = _AT["request_body_size"], _AT["response_body_size"]
_REQ_CHARSET, _RESP_CHARSET = _AT["request_body_charset"], _AT["response_body_charset"]
_REQ_HEADERS, _RESP_HEADERS = _AT["request_headers"], _AT["response_headers"]
_SUBSTITUTED, _REFUSED = _AT["substituted_credentials"], _AT["refused_credentials"]


def _deltas(cur: sqlite3.Cursor, p: list[Any] | tuple, tid: int) -> None:
    """Store the row's bodies as deltas where they can be (greyproxy.bodies.DeltaEncoder), once per
    inserted row, in the same write transaction."""
    if p[_REQ_BODY] is None and p[_RESP_BODY] is None:
        return
    DELTAS.stored(
        cur, tid, p[_CONTAINER], p[_METHOD], p[_URL], (p[_REQ_BODY], p[_REQ_CODEC]), (p[_RESP_BODY], p[_RESP_CODEC])
    )


_N = len(_COLUMNS)
_SHAPE2_IS_FIELDS = records.TRANSACTION_FIELDS == _COLUMNS  # else a shape-2 array is mapped by name


def _params(data: list[Any] | dict[str, Any], now: float) -> list[Any]:
    """A `transaction` record's values in FIELDS order, as stored (JSON columns as text, bodies as
    greyproxy.bodies stores them). The record is an array (shape 2, bus/records.py), or an object
    (shape 1, from a proxy of before). ValueError/TypeError for a record that cannot be stored."""
    if isinstance(data, list):
        n = len(data)
        if n > len(records.TRANSACTION_FIELDS):
            raise ValueError(f"transaction record with {n} values (at most {len(records.TRANSACTION_FIELDS)})")
        if _SHAPE2_IS_FIELDS:
            p = data + [None] * (_N - n) if n < _N else data
        else:  # pragma: no cover - a column added to the table and not to the record's shape
            p = list(map(dict(zip(records.TRANSACTION_FIELDS, data)).get, _COLUMNS))
    else:
        p = list(map(data.get, _COLUMNS))
    # (each place by name, not a loop over a tuple of places: a record of a plain request is only
    # looked at, each look a C index when compiled)
    if p[_TS] is None:
        p[_TS] = now
    if type(p[_PORT]) is not int:
        p[_PORT] = int(p[_PORT] or 0)
    if type(p[_REQ_SIZE]) is not int:
        p[_REQ_SIZE] = int(p[_REQ_SIZE] or 0)
    if type(p[_RESP_SIZE]) is not int:
        p[_RESP_SIZE] = int(p[_RESP_SIZE] or 0)
    if p[_RESULT] is None:
        p[_RESULT] = "allowed"
    p[_MISMATCH] = 1 if p[_MISMATCH] else 0
    if p[_REQ_BODY] is None and p[_REQ_CODEC] is None:
        p[_REQ_CHARSET] = None  # as from_record leaves a side without a body
    else:
        _body(p, "request", _REQ_BODY, _REQ_CODEC, _REQ_CHARSET)
    if p[_RESP_BODY] is None and p[_RESP_CODEC] is None:
        p[_RESP_CHARSET] = None
    else:
        _body(p, "response", _RESP_BODY, _RESP_CODEC, _RESP_CHARSET)
    if (
        type(p[_CONTAINER]) is not str
        or type(p[_HOST]) is not str
        or type(p[_METHOD]) is not str
        or type(p[_URL]) is not str
    ):
        for i in _TEXT_AT:
            if type(p[i]) is not str:
                raise ValueError(f"transaction record without {_COLUMNS[i]}")
    if (
        type(p[_REQ_HEADERS]) is not str
        or type(p[_RESP_HEADERS]) is not str
        or type(p[_SUBSTITUTED]) is not str
        or type(p[_REFUSED]) is not str
    ):
        for i, default in _JSON_AT:
            value = p[i]
            if type(value) is not str:  # shape 2 carries JSON text, stored as it is
                p[i] = (_dumps(value) if value is not None else default).decode()
    return p


def _body(p: list[Any], side: str, body: int, codec: int, charset: int) -> None:
    """A side's body as stored (greyproxy.bodies.from_record: base64 in the record → the BLOB)."""
    row = {f"{side}_body": p[body], f"{side}_body_codec": p[codec], f"{side}_body_charset": p[charset]}
    from_record(row, side)
    p[body], p[charset] = row[f"{side}_body"], row[f"{side}_body_charset"]


def _payload(row: Row, data: Any) -> dict[str, Any]:
    return transaction_json(row.as_dict(), include_bodies=False)


def refused_event(row: Row) -> Event:
    """`credential.refused` for a request the credential hook refused (SPEC §12.7), after the commit."""
    return (
        topics.CREDENTIAL_REFUSED,
        {
            "transaction_id": row.id,
            "container_name": row.get("container_name"),
            "destination_host": row.get("destination_host"),
            "reason": row.get("block_reason"),
            "labels": list(orjson.loads(row.get("refused_credentials") or "[]")),
            "session_id": row.get("session_id"),
        },
    )


def apply_transaction(cur: sqlite3.Cursor, data: dict[str, Any], events: list[Event]) -> None:
    params = _params(data, time.time())
    cur.execute(table.INSERT, params)
    row = Row(_COLUMNS, params, cur.lastrowid)
    _deltas(cur, params, int(cur.lastrowid or 0))
    events.append((topics.TRANSACTION_NEW, Deferred(_payload, row, data)))
    if params[_BLOCK] in CREDENTIAL_REASONS:
        events.append(refused_event(row))


def apply_transaction_run(cur: sqlite3.Cursor, run: list[Record], events: list[Event]) -> None:
    start = len(events)
    apply_run(
        cur,
        run,
        events,
        "http_transactions",
        table.INSERT,
        _COLUMNS,
        _params,
        topics.TRANSACTION_NEW,
        _payload,
    )
    # Refusals by the credential hook are rare: look for them only among this run's rows.
    told = {d["transaction_id"] for t, d in events[start:] if t == topics.CREDENTIAL_REFUSED}
    for topic, ev in events[start:]:
        if topic != topics.TRANSACTION_NEW:
            continue
        if type(ev) is Rows:
            refused = False
            for p, tid in zip(ev.params, ev.ids):  # (a row applied alone, a Deferred, had it already)
                if p[_REQ_BODY] is not None or p[_RESP_BODY] is not None:
                    _deltas(cur, p, tid)
                if p[_BLOCK] is not None and p[_BLOCK] in CREDENTIAL_REASONS:
                    refused = True
            if refused:
                events.extend(refused_event(r) for r in ev.rows() if r.params[_BLOCK] in CREDENTIAL_REASONS)
        elif type(ev) is Deferred:
            row = ev.row
            if row.params[_BLOCK] in CREDENTIAL_REASONS and row.id not in told:
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
