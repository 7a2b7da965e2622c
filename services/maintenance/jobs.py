"""Maintenance jobs and periodic duties. Each job works in short batches so the recorder's
writes are never held back for more than a moment."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from greyproxy.bodies import Reader, detach

log = logging.getLogger("greyproxy.maintenance")

DAY = 86_400.0
BATCH = 2_000

# A job is a generator over (processed, total) progress steps; it does its writes in batches.
JobFn = Callable[[sqlite3.Connection, dict[str, Any]], Iterator[tuple[int, int]]]


@dataclass
class JobState:
    running: bool = False
    processed: int = 0
    total: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# Tables created WITHOUT ROWID have no rowid: batches are picked by their primary key instead.
KEY_COLUMN = {"journal_applied": "record_id"}


def _delete_in_batches(conn: sqlite3.Connection, table: str, where: str, params: tuple) -> int:
    """DELETE ... LIMIT-style in small transactions so other writers interleave."""
    removed = 0
    key = KEY_COLUMN.get(table, "rowid")
    while True:
        cur = conn.execute(
            f"DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} WHERE {where} LIMIT {BATCH})", params
        )
        removed += cur.rowcount
        if cur.rowcount < BATCH:
            return removed
        time.sleep(0.005)


def _write(conn: sqlite3.Connection, fn: Callable[[], Any]) -> Any:
    conn.execute("BEGIN IMMEDIATE")
    try:
        out = fn()
        conn.execute("COMMIT")
        return out
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def drop_transactions(conn: sqlite3.Connection, ids: list[int], sql: str, reader: Reader | None = None) -> int:
    """Run `sql` (a DELETE or an UPDATE that drops bodies, with `{marks}` for the ids) on `ids` in one
    write transaction, after re-encoding as self-contained the bodies outside `ids` stored as deltas
    against theirs (greyproxy.bodies.detach): every body left still reads back."""

    def write() -> int:
        detach(conn.execute, ids, reader)
        return conn.execute(sql.format(marks=",".join("?" * len(ids))), ids).rowcount

    return _write(conn, write) if ids else 0


def _prune_transactions(conn: sqlite3.Connection, before: float) -> int:
    removed = 0
    while True:
        ids = [
            r[0] for r in conn.execute(f"SELECT id FROM http_transactions WHERE timestamp < ? LIMIT {BATCH}", (before,))
        ]
        removed += drop_transactions(conn, ids, "DELETE FROM http_transactions WHERE id IN ({marks})")
        if len(ids) < BATCH:
            return removed
        time.sleep(0.005)


def prune(conn: sqlite3.Connection, opts: dict[str, Any]) -> Iterator[tuple[int, int]]:
    """Retention: old logs and transactions, rules expired over 7 days ago, stale pending, old journal ids."""
    now = time.time()
    retention = float(opts.get("retention_days", 30)) * DAY
    pending_ttl = float(opts.get("pending_ttl_days", 7)) * DAY
    steps: list[tuple[str, str, tuple]] = [
        ("logs", "timestamp < ?", (now - retention,)),
        ("http_transactions", "timestamp < ?", (now - retention,)),
        ("llm_requests", "timestamp < ?", (now - retention,)),  # SPEC §13.5.8
        ("conversations", "ended_at < ?", (now - retention,)),
        ("rules", "expires_at IS NOT NULL AND expires_at < ? AND source != 'builtin'", (now - 7 * DAY,)),
        ("pending", "last_seen < ?", (now - pending_ttl,)),
        ("journal_applied", "applied_at < ?", (now - DAY,)),
        ("journal_ranges", "applied_at < ?", (now - DAY,)),  # migration 9
        ("dns_cache", "updated_at < ?", (now - 7 * DAY,)),
    ]
    total = len(steps)
    removed: dict[str, int] = {}
    for i, (table, where, params) in enumerate(steps, 1):
        try:
            if table == "http_transactions":  # bodies may be delta bases of newer ones (greyproxy.bodies)
                removed[table] = _prune_transactions(conn, params[0])
                yield i, total
                continue
            removed[table] = _delete_in_batches(conn, table, where, params)
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
        yield i, total
    conn.execute("PRAGMA optimize")
    if any(removed.values()):
        log.info("pruned %s", {k: v for k, v in removed.items() if v})


# --------------------------------------------------------------------------- the size cap (SPEC §15)

MIB = 1024 * 1024
CAP_LOW_WATER = 0.8  # once over the cap, drop down to this share of it (room for the -wal and what comes next)
CAP_BODY_BATCH = 200  # rows whose bodies are dropped per transaction (bodies are up to 2 x capture.maxBodyBytes)
CAP_ROW_BATCH = 500  # rows deleted per transaction
_NO_BODIES = (
    "request_body = NULL, request_body_codec = NULL, request_body_charset = NULL,"
    " response_body = NULL, response_body_codec = NULL, response_body_charset = NULL,"
    " request_body_base = NULL, response_body_base = NULL"
)


def used_bytes(conn: sqlite3.Connection) -> int:
    """The bytes the database holds: its pages in use (free pages left out: SQLite reuses them, and
    incremental_vacuum gives them back) plus the -wal file."""
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
    return pages * page_size + _wal_size(conn)


def _wal_size(conn: sqlite3.Connection) -> int:
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    try:
        return os.path.getsize(f"{path}-wal") if path else 0
    except OSError:
        return 0


def over_cap(conn: sqlite3.Connection, cap_mib: float) -> bool:
    """The periodic check: over the cap even after the -wal is checkpointed and truncated?"""
    cap = cap_mib * MIB
    if used_bytes(conn) <= cap:
        return False
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # a big -wal alone is not data to drop
    # ...and when the -wal cannot shrink (a reader holds it), dropping data under the low-water mark
    # would not help: the job only runs when it has something to drop.
    return used_bytes(conn) > cap and _data_bytes(conn) > cap * CAP_LOW_WATER


def _data_bytes(conn: sqlite3.Connection) -> int:
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    return (
        conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
    ) * page_size


# (kind, the next rows after an id with their bytes (estimated for rows), what drops them), oldest first.
_BODY_BYTES = "COALESCE(length(request_body), 0) + COALESCE(length(response_body), 0)"
_CAP_STEPS = [
    (
        "bodies",
        f"SELECT id, {_BODY_BYTES} FROM http_transactions WHERE id > ?"
        " AND (request_body IS NOT NULL OR response_body IS NOT NULL) ORDER BY id LIMIT ?",
        f"UPDATE http_transactions SET {_NO_BODIES} WHERE id IN ({{marks}})",
    ),
    (
        "transactions",
        f"SELECT id, {_BODY_BYTES} + length(url) + COALESCE(length(request_headers), 0)"
        " + COALESCE(length(response_headers), 0) + 100 FROM http_transactions WHERE id > ?"
        " ORDER BY id LIMIT ?",
        "DELETE FROM http_transactions WHERE id IN ({marks})",
    ),
    (
        "logs",
        "SELECT id, length(destination_host) + length(container_name) + 100 FROM logs WHERE id > ? ORDER BY id LIMIT ?",
        "DELETE FROM logs WHERE id IN ({marks})",
    ),
]


def size_cap(conn: sqlite3.Connection, opts: dict[str, Any]) -> Iterator[tuple[int, int]]:
    """`retention.maxDatabaseMiB`: drop the oldest bodies (set NULL, the rows stay), then the oldest
    transactions, then the oldest logs, in batches, until the data is under CAP_LOW_WATER of the
    cap; then give the freed pages back (incremental_vacuum when the file allows it: files created
    by this version, greyproxy/store/db.py; older files keep their size and reuse the free pages). Progress is in KiB:
    (freed, to free)."""
    cap = float(opts["max_database_mib"]) * MIB
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    start = _data_bytes(conn)
    target = int(cap * CAP_LOW_WATER)
    need = max(0, start - target)
    dropped = {"bodies": 0, "transactions": 0, "logs": 0}
    reader = Reader(conn.execute)
    if need:
        for what, pick, drop in _CAP_STEPS:
            after = 0
            while (excess := _data_bytes(conn) - target) > 0:
                ids: list[int] = []
                size = 0
                for rid, n in conn.execute(pick, (after, CAP_ROW_BATCH if what != "bodies" else CAP_BODY_BATCH)):
                    ids.append(rid)
                    size += n
                    if size >= excess:  # just enough rows to be under (their bytes, estimated)
                        break
                if not ids:
                    break  # nothing of this kind left: the next kind
                if what == "logs":
                    conn.execute(drop.format(marks=",".join("?" * len(ids))), ids)
                else:
                    drop_transactions(conn, ids, drop, reader)
                after = ids[-1]
                dropped[what] += len(ids)
                yield (max(0, start - _data_bytes(conn)) // 1024, need // 1024)
                time.sleep(0.002)  # let the recorder's batches in
            if _data_bytes(conn) <= target:
                break
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    vacuum = conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
    if vacuum:
        while conn.execute("PRAGMA freelist_count").fetchone()[0]:
            conn.execute("PRAGMA incremental_vacuum(2000)").fetchall()  # ~8 MiB per step, the lock let go between
            time.sleep(0.002)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    end = _data_bytes(conn)
    yield (max(0, start - end) // 1024, need // 1024)
    if any(dropped.values()):
        log.warning(
            "database over retention.maxDatabaseMiB (%d MiB): dropped the oldest %d bodies, %d transactions"
            " and %d logs; %.1f MiB of data now (was %.1f)%s",
            cap // MIB,
            dropped["bodies"],
            dropped["transactions"],
            dropped["logs"],
            end / MIB,
            start / MIB,
            "" if vacuum else "; the file keeps its size (created before auto_vacuum), free pages are reused",
        )
    elif need:
        log.warning("database over retention.maxDatabaseMiB (%d MiB) with nothing left to drop", cap // MIB)


JOBS: dict[str, JobFn] = {"prune": prune, "size-cap": size_cap}


def register(name: str, fn: JobFn) -> None:
    JOBS[name] = fn
