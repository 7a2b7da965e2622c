"""Applying journal records to SQLite: one transaction per batch, idempotent on record id.

Returns the events to publish after the commit (so a subscriber that reads the database on
an event finds the change).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from typing import Any

from bus import topics
from greyproxy.shapes import log_json, pending_json

log = logging.getLogger("greyproxy.recorder")

Event = tuple[str, Any]

LOG_COLUMNS = ("timestamp", "container_name", "container_id", "destination_host", "destination_port",
               "resolved_hostname", "method", "result", "rule_id", "response_time_ms", "reason",
               "mitm_skip_reason")
_LOG_INSERT = f"INSERT INTO logs ({', '.join(LOG_COLUMNS)}) VALUES ({', '.join('?' * len(LOG_COLUMNS))})"


def _apply_log(cur: sqlite3.Cursor, data: dict[str, Any], events: list[Event]) -> None:
    row = {k: data.get(k) for k in LOG_COLUMNS}
    row["container_id"] = row["container_id"] or ""
    if row["timestamp"] is None:
        row["timestamp"] = time.time()
    cur.execute(_LOG_INSERT, tuple(row[k] for k in LOG_COLUMNS))
    row["id"] = cur.lastrowid
    events.append((topics.LOG_NEW, log_json(row, data.get("rule_summary"))))


def _apply_pending(cur: sqlite3.Cursor, data: dict[str, Any], events: list[Event]) -> None:
    """A sighting of an unknown destination: bump the entry (or its sibling), or create it."""
    ts = float(data.get("ts") or time.time())
    container, host, port = data["container_name"], data["destination_host"], int(data["destination_port"])
    resolved = data.get("resolved_hostname")
    row = cur.execute(
        "SELECT id FROM pending WHERE container_name = ? AND destination_host = ? AND destination_port = ?",
        (container, host, port),
    ).fetchone()
    if row is None and resolved:
        # Another IP of the same named host: merge into the existing entry.
        row = cur.execute(
            "SELECT id FROM pending WHERE container_name = ? AND resolved_hostname = ? AND destination_port = ?"
            " ORDER BY last_seen DESC LIMIT 1",
            (container, resolved, port),
        ).fetchone()
    if row is None:
        cur.execute(
            "INSERT INTO pending (container_name, container_id, destination_host, destination_port,"
            " resolved_hostname, first_seen, last_seen, attempt_count) VALUES (?, ?, ?, ?, ?, ?, ?, 1)",
            (container, data.get("container_id") or "", host, port, resolved, ts, ts),
        )
        pid, topic = cur.lastrowid, topics.PENDING_CREATED
    else:
        pid, topic = row[0], topics.PENDING_UPDATED
        cur.execute(
            "UPDATE pending SET last_seen = MAX(last_seen, ?), attempt_count = attempt_count + 1,"
            " resolved_hostname = COALESCE(resolved_hostname, ?) WHERE id = ?",
            (ts, resolved, pid),
        )
    full = cur.execute(
        "SELECT id, container_name, container_id, destination_host, destination_port, resolved_hostname,"
        " first_seen, last_seen, attempt_count FROM pending WHERE id = ?",
        (pid,),
    ).fetchone()
    keys = ("id", "container_name", "container_id", "destination_host", "destination_port",
            "resolved_hostname", "first_seen", "last_seen", "attempt_count")
    events.append((topic, pending_json(dict(zip(keys, full)), int(data.get("waiting") or 0))))


def _apply_rule_hit(cur: sqlite3.Cursor, data: dict[str, Any], events: list[Event]) -> None:
    cur.execute(
        "UPDATE rules SET hit_count = hit_count + ?, last_used_at = MAX(COALESCE(last_used_at, 0), ?) WHERE id = ?",
        (int(data.get("count") or 1), float(data.get("last_used_at") or time.time()), int(data["rule_id"])),
    )


def _apply_dns(cur: sqlite3.Cursor, data: dict[str, Any], events: list[Event]) -> None:
    cur.execute(
        "INSERT INTO dns_cache (ip, hostname, updated_at) VALUES (?, ?, ?)"
        " ON CONFLICT(ip) DO UPDATE SET hostname = excluded.hostname, updated_at = excluded.updated_at",
        (data["ip"], data["hostname"], float(data.get("ts") or time.time())),
    )


APPLIERS = {
    "log": _apply_log,
    "pending": _apply_pending,
    "rule_hit": _apply_rule_hit,
    "dns": _apply_dns,
}


def register(kind: str, fn) -> None:
    """Later capabilities (transactions, conversations) add their record kinds here."""
    APPLIERS[kind] = fn


def apply_records(conn: sqlite3.Connection, records: list[tuple[str, str, Any]]) -> list[Event]:
    """Apply a batch in one transaction; a record id already applied is skipped."""
    events: list[Event] = []
    now = time.time()
    cur = conn.cursor()
    cur.execute("BEGIN IMMEDIATE")
    try:
        for rid, kind, data in records:
            cur.execute("INSERT OR IGNORE INTO journal_applied (record_id, applied_at) VALUES (?, ?)", (rid, now))
            if cur.rowcount == 0:
                continue  # already applied: a resend after a lost ack
            fn = APPLIERS.get(kind)
            if fn is None:
                log.warning("journal: unknown record kind %r (id %s) skipped", kind, rid)
                continue
            try:
                cur.execute("SAVEPOINT rec")
                fn(cur, data, events)
                cur.execute("RELEASE rec")
            except (KeyError, TypeError, ValueError, sqlite3.IntegrityError) as exc:
                # A malformed record must not block the ones behind it: drop it, keep it marked applied.
                cur.execute("ROLLBACK TO rec")
                cur.execute("RELEASE rec")
                log.warning("journal: bad %s record %s dropped: %s", kind, rid, exc)
        cur.execute("COMMIT")
    except BaseException:
        cur.execute("ROLLBACK")
        raise
    return events
