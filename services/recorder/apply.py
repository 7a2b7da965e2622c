"""Applying journal records to SQLite: one transaction per batch, idempotent on record id.

Returns the events to publish after the commit (so a subscriber that reads the database on
an event finds the change). With `lazy=True` the per-request events (`log.new`,
`transaction.new`) come back as `Deferred` payloads, built only if someone subscribes to the
topic when they are published (see services/recorder/service.py).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from operator import itemgetter
from typing import Any

from bus import records as kinds
from bus import topics
from greyproxy.shapes import log_json, pending_json
from greyproxy.store import dns_cache, identities, journal_applied, logs, pending, rules

log = logging.getLogger("greyproxy.recorder")

Event = tuple[str, Any]
Record = tuple[str, str, Any]  # (record id, kind, data)

LOG_COLUMNS = logs.FIELDS
_log_params = itemgetter(*LOG_COLUMNS)


class Deferred:
    """An event payload not built yet: `fn(row, data)`, called by `build()` once someone wants it."""

    __slots__ = ("fn", "row", "data")

    def __init__(self, fn: Callable[[dict[str, Any], Any], Any], row: dict[str, Any], data: Any) -> None:
        self.fn, self.row, self.data = fn, row, data

    def build(self) -> Any:
        return self.fn(self.row, self.data)


def materialize(events: list[Event]) -> list[Event]:
    """The events with every Deferred payload built."""
    return [(t, d.build() if type(d) is Deferred else d) for t, d in events]


def _log_row(data: dict[str, Any]) -> dict[str, Any]:
    row = {k: data.get(k) for k in LOG_COLUMNS}
    row["container_id"] = row["container_id"] or ""
    if row["timestamp"] is None:
        row["timestamp"] = time.time()
    return row


def _log_payload(row: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    return log_json(row, data.get("rule_summary"))


def _apply_log(cur: sqlite3.Cursor, data: dict[str, Any], events: list[Event]) -> None:
    row = _log_row(data)
    cur.execute(logs.INSERT, _log_params(row))
    row["id"] = cur.lastrowid
    events.append((topics.LOG_NEW, Deferred(_log_payload, row, data)))


def _log_build(data: dict[str, Any]) -> tuple[dict[str, Any], tuple]:
    row = _log_row(data)
    return row, _log_params(row)


def _apply_log_run(cur: sqlite3.Cursor, run: list[Record], events: list[Event]) -> None:
    apply_run(cur, run, events, "logs", logs.INSERT, _log_build, topics.LOG_NEW, _log_payload)


def _apply_pending(cur: sqlite3.Cursor, data: dict[str, Any], events: list[Event]) -> None:
    """A sighting of an unknown destination: bump the entry (or its sibling), or create it."""
    ts = float(data.get("ts") or time.time())
    container, host, port = data["container_name"], data["destination_host"], int(data["destination_port"])
    resolved = data.get("resolved_hostname")
    row = cur.execute(pending.FIND, (container, host, port)).fetchone()
    if row is None and resolved:
        # Another IP of the same named host: merge into the existing entry.
        row = cur.execute(pending.FIND_SIBLING, (container, resolved, port)).fetchone()
    if row is None:
        cur.execute(pending.INSERT, (container, data.get("container_id") or "", host, port, resolved, ts, ts))
        pid, topic = cur.lastrowid, topics.PENDING_CREATED
    else:
        pid, topic = row[0], topics.PENDING_UPDATED
        cur.execute(pending.BUMP, (ts, resolved, pid))
    full = cur.execute(pending.GET, (pid,)).fetchone()
    events.append((topic, pending_json(dict(zip(pending.COLUMNS, full)), int(data.get("waiting") or 0))))


def _apply_rule_hit(cur: sqlite3.Cursor, data: dict[str, Any], events: list[Event]) -> None:
    cur.execute(
        rules.ADD_HITS,
        (int(data.get("count") or 1), float(data.get("last_used_at") or time.time()), int(data["rule_id"])),
    )


def _apply_identity_used(cur: sqlite3.Cursor, data: dict[str, Any], events: list[Event]) -> None:
    cur.execute(identities.TOUCH, (float(data.get("last_used_at") or time.time()), str(data["name"])))


def _apply_dns(cur: sqlite3.Cursor, data: dict[str, Any], events: list[Event]) -> None:
    cur.execute(dns_cache.UPSERT, (data["ip"], data["hostname"], float(data.get("ts") or time.time())))


APPLIERS = {
    kinds.LOG: _apply_log,
    kinds.PENDING: _apply_pending,
    kinds.RULE_HIT: _apply_rule_hit,
    kinds.DNS: _apply_dns,
    kinds.IDENTITY_USED: _apply_identity_used,
}


# Kinds that may also be applied a run at a time (one executemany): kind -> fn(cur, run, events).
# Such a function falls back to one record at a time itself (`apply_run` does) when one is bad.
RUN_APPLIERS: dict[str, Any] = {}


def register(kind: str, fn, run_fn=None) -> None:
    """Later capabilities (transactions, conversations) add their record kinds here."""
    APPLIERS[kind] = fn
    if run_fn is not None:
        RUN_APPLIERS[kind] = run_fn


_RUN_ERRORS = (TypeError, ValueError, OverflowError, sqlite3.IntegrityError, sqlite3.InterfaceError)


def apply_run(
    cur: sqlite3.Cursor,
    run: list[Record],
    events: list[Event],
    table: str,
    sql: str,
    build: Callable[[dict[str, Any]], tuple[dict[str, Any], tuple]],
    topic: str,
    payload: Callable[[dict[str, Any], Any], Any],
) -> None:
    """A run of records of one kind as one executemany of `sql` into `table` (there is one record
    per proxied request, so runs are long). `build(data)` gives the row and its parameters; each
    row's event on `topic` is published after the commit with the payload `payload(row, data)`,
    deferred (built only if someone wants it). Any bad record: the run is undone and applied one
    record at a time, so only the bad one is dropped."""
    try:
        built = [build(data) for _rid, _kind, data in run]
    except (AttributeError, KeyError, TypeError, ValueError):  # orjson's encode error is a TypeError
        _apply_each(cur, run, events)
        return
    cur.execute("SAVEPOINT run")
    try:
        ids = insert_run(cur, table, sql, [params for _row, params in built])
        cur.execute("RELEASE run")
    except _RUN_ERRORS:
        cur.execute("ROLLBACK TO run")
        cur.execute("RELEASE run")
        _apply_each(cur, run, events)
        return
    for (row, _params), rid, (_r, _k, data) in zip(built, ids, run):
        row["id"] = rid
        events.append((topic, Deferred(payload, row, data)))


def insert_run(cur: sqlite3.Cursor, table: str, sql: str, params: list[tuple]) -> list[int]:
    """executemany `sql` into an AUTOINCREMENT `table`; the new rows' ids in order. This is the only
    writer inside its IMMEDIATE transaction, so they are the sequence's next ones."""

    def seq() -> int:
        row = cur.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
        return int(row[0]) if row else 0

    base = seq()
    cur.executemany(sql, params)
    if seq() == base + len(params):
        return list(range(base + 1, base + len(params) + 1))
    return [r[0] for r in cur.execute(f"SELECT id FROM {table} WHERE id > ? ORDER BY id", (base,))]  # pragma: no cover


def _apply_others(cur: sqlite3.Cursor, records: list[Record], events: list[Event]) -> None:
    """Kinds with a run applier go in a run per kind (each in its own order), the rest one by one."""
    singles: list[Record] = []
    runs: dict[str, list[Record]] = {}
    for rec in records:
        if rec[1] in RUN_APPLIERS:
            runs.setdefault(rec[1], []).append(rec)
        else:
            singles.append(rec)
    if singles:
        _apply_each(cur, singles, events)
    for kind, run in runs.items():
        if len(run) > 1:
            RUN_APPLIERS[kind](cur, run, events)
        else:
            _apply_each(cur, run, events)


def _apply_each(cur: sqlite3.Cursor, records: list[Record], events: list[Event]) -> None:
    """One record at a time, each in a savepoint: a bad one is dropped, the others applied."""
    for rid, kind, data in records:
        fn = APPLIERS.get(kind)
        if fn is None:
            log.warning("journal: unknown record kind %r (id %s) skipped", kind, rid)
            continue
        try:
            cur.execute("SAVEPOINT rec")
            fn(cur, data, events)
            cur.execute("RELEASE rec")
        except (AttributeError, KeyError, *_RUN_ERRORS) as exc:
            # A malformed record must not block the ones behind it: drop it, keep it marked applied.
            cur.execute("ROLLBACK TO rec")
            cur.execute("RELEASE rec")
            log.warning("journal: bad %s record %s dropped: %s", kind, rid, exc)


_ID_CHUNK = 500  # bound parameters per "already applied?" query


def _fresh(cur: sqlite3.Cursor, records: list[Record], now: float) -> list[Record]:
    """The records not applied before (nor earlier in this batch), now marked applied."""
    # The usual batch has only new ids: marking them all at once (the primary key refuses an id
    # seen before) spares a look-up per record. A refusal means a resend: undo, sort them out.
    cur.execute("SAVEPOINT fresh")
    try:
        cur.executemany(journal_applied.MARK, [(rec[0], now) for rec in records])
        cur.execute("RELEASE fresh")
        return records
    except sqlite3.IntegrityError:
        cur.execute("ROLLBACK TO fresh")
        cur.execute("RELEASE fresh")
    seen: set[str] = set()
    for i in range(0, len(records), _ID_CHUNK):
        ids = [r[0] for r in records[i : i + _ID_CHUNK]]
        seen.update(row[0] for row in cur.execute(journal_applied.select_applied(len(ids)), ids))
    fresh = []
    for rec in records:
        if rec[0] in seen:
            continue  # already applied: a resend after a lost ack
        seen.add(rec[0])
        fresh.append(rec)
    cur.executemany(journal_applied.MARK, [(rec[0], now) for rec in fresh])
    return fresh


def apply_records(conn: sqlite3.Connection, records: list[tuple[str, str, Any]], lazy: bool = False) -> list[Event]:
    """Apply a batch in one transaction; a record id already applied is skipped. The log records
    (the bulk of the journal) go in together with one executemany, after the other kinds, each
    kind in its own order (log rows depend on no other record, and no other record on them).
    The events to publish come back with their payloads built, or with `lazy` some of them as
    `Deferred` ones, for the publisher to build only if someone subscribes to their topic."""
    events: list[Event] = []
    now = time.time()
    cur = conn.cursor()
    cur.execute("BEGIN IMMEDIATE")
    try:
        fresh = _fresh(cur, records, now)
        log_recs = [rec for rec in fresh if rec[1] == kinds.LOG]
        if len(log_recs) < len(fresh):
            _apply_others(cur, [rec for rec in fresh if rec[1] != kinds.LOG], events)
        if len(log_recs) > 1:
            _apply_log_run(cur, log_recs, events)
        else:
            _apply_each(cur, log_recs, events)
        cur.execute("COMMIT")
    except BaseException:
        cur.execute("ROLLBACK")
        raise
    return events if lazy else materialize(events)
