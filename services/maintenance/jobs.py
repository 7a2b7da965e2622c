"""Maintenance jobs and periodic duties. Each job works in short batches so the recorder's
writes are never held back for more than a moment."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

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
        ("dns_cache", "updated_at < ?", (now - 7 * DAY,)),
    ]
    total = len(steps)
    removed: dict[str, int] = {}
    for i, (table, where, params) in enumerate(steps, 1):
        try:
            removed[table] = _delete_in_batches(conn, table, where, params)
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
        yield i, total
    conn.execute("PRAGMA optimize")
    if any(removed.values()):
        log.info("pruned %s", {k: v for k, v in removed.items() if v})

JOBS: dict[str, JobFn] = {"prune": prune}


def register(name: str, fn: JobFn) -> None:
    JOBS[name] = fn
