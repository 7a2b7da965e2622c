"""Maintenance jobs and periodic duties. Each job works in short batches so the recorder's
writes are never held back for more than a moment."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from greyproxy.bodies import Reader, detach
from greyproxy.throttle import Throttle

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


def write_txn(conn: sqlite3.Connection, fn: Callable[[], Any]) -> Any:
    """Run `fn` in one BEGIN IMMEDIATE transaction on `conn`: committed if it returns, rolled back if it raises."""
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

    return write_txn(conn, write) if ids else 0


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
        ("journal_ranges", "applied_at < ?", (now - DAY,)),  # migration 10
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
CAP_HIGH_WATER = 0.8  # the job starts when the database holds more than this share of the cap...
CAP_LOW_WATER = 0.65  # ...and drops down to this share: what arrives between checks and the -wal of the
# job's own steps stay under the cap (measured: bench/results.md, soak)
CAP_BODY_AGE = 3600.0  # bodies alone are dropped only from transactions older than this (seconds)
CAP_BODY_BATCH = 100  # rows whose bodies are dropped per write transaction (bodies are up to 2 x capture.maxBodyBytes)
CAP_ROW_BATCH = 500  # transactions + logs deleted per write transaction
CAP_VACUUM_PAGES = 128  # pages given back per incremental_vacuum step (512 KiB at 4 KiB pages), -wal truncated between
CAP_CHECKPOINT_WAIT_MS = 100  # how long a TRUNCATE checkpoint may wait for readers (it holds writers back meanwhile)
_NO_BODIES = (
    "request_body = NULL, request_body_codec = NULL, request_body_charset = NULL,"
    " response_body = NULL, response_body_codec = NULL, response_body_charset = NULL,"
    " request_body_base = NULL, response_body_base = NULL"
)


def used_bytes(conn: sqlite3.Connection) -> int:
    """The bytes the database holds: its pages in use (free pages left out: SQLite reuses them, and
    incremental_vacuum gives them back) plus the -wal file."""
    return _data_bytes(conn) + _wal_size(conn)


def _wal_size(conn: sqlite3.Connection) -> int:
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    try:
        return os.path.getsize(f"{path}-wal") if path else 0
    except OSError:
        return 0


def _checkpoint(conn: sqlite3.Connection, mode: str, wait_ms: int) -> tuple[int, int, int] | None:
    """`PRAGMA wal_checkpoint(mode)` waiting at most `wait_ms` for the write lock and readers: while a
    FULL, RESTART or TRUNCATE checkpoint waits it blocks the writers (the recorder), so it must not
    wait for long. (busy, frames in the -wal, frames checkpointed), or None when it was locked out:
    the -wal stays as it is for now, and a checkpoint that cannot finish is retried later."""
    timeout = conn.execute("PRAGMA busy_timeout").fetchone()[0]
    conn.execute(f"PRAGMA busy_timeout = {wait_ms}")
    try:
        return conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(timeout)}")


def _truncate_wal(conn: sqlite3.Connection) -> None:
    """Checkpoint and truncate the -wal, waiting at most CAP_CHECKPOINT_WAIT_MS for readers."""
    _checkpoint(conn, "TRUNCATE", CAP_CHECKPOINT_WAIT_MS)


# ------------------------------------------------------------------ checkpoints (database.checkpointInterval)

WAL_RESTART_WAIT_MS = 50  # how long the second step may hold the recorder back waiting for readers


class WalCheckpointer:
    """Maintenance's checkpoint of the -wal, every `database.checkpointInterval` seconds, so that the
    recorder's COMMITs do not run SQLite's automatic checkpoint (it did, every 1 000 pages: copying the
    pages to the database file and syncing it, ~0.8 µs CPU a request and the wait for the sync;
    bench/results.md, s6-c). The recorder's `wal_autocheckpoint` (`database.walAutocheckpoint`, 4 000
    pages) stays as the bound when maintenance is down or behind.

    One `run()`: nothing when the -wal is unchanged since the last one (its mtime and size: idle costs a
    stat). Else a PASSIVE checkpoint copies the -wal's pages into the database file without holding
    anyone back; then a RESTART one copies what the recorder committed meanwhile (a batch or two) and
    waits, at most WAL_RESTART_WAIT_MS with the recorder held back, until no reader reads the -wal. Only
    then does the recorder's next write start the -wal from its beginning: after a PASSIVE alone the
    recorder has nearly always committed a batch meanwhile (a checkpoint takes 10-40 ms, a batch
    comes every 20 ms under load), the -wal is never wholly copied when it writes, and it grows to
    the recorder's bound (measured: 1 400, 2 700, 4 000 pages, then the recorder's own checkpoint).

    A checkpoint changes no reader's view: a reader reads the pages of its snapshot from the -wal or
    the database file, whichever holds them, and the file's pages are overwritten only up to the
    oldest reader's snapshot."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        path = conn.execute("PRAGMA database_list").fetchone()[2]
        self.wal_path = f"{path}-wal" if path else ""
        self._seen: tuple[int, int] | None = None
        self.runs = 0  # checkpoints made (a PASSIVE + RESTART pair counts once)
        self.busy = 0  # ...of which could not finish (locked out, or readers on the -wal past the wait)
        self.last_pages = 0  # the -wal's pages at the last one: how far it grew between two

    def run(self) -> bool:
        """One checkpoint if the -wal changed since the last; whether it ran."""
        try:
            st = os.stat(self.wal_path) if self.wal_path else None
        except OSError:
            return False  # no -wal (yet): nothing to copy
        seen = (st.st_mtime_ns, st.st_size) if st is not None else None
        if seen is not None and seen == self._seen:
            return False
        self._seen = seen  # before checkpointing: a write during it changes these, the next run sees it
        first = _checkpoint(self.conn, "PASSIVE", 0)
        if first is not None and not first[0] and first[1] <= 0:
            return False  # an empty -wal (or not in WAL mode)
        self.runs += 1
        second = None if first is None or first[0] else _checkpoint(self.conn, "RESTART", WAL_RESTART_WAIT_MS)
        if second is None or second[0]:
            self.busy += 1
            self._seen = None  # not finished: again next time even if nothing is written meanwhile
        else:
            self.last_pages = second[1]
        return True

    def stats(self) -> dict[str, int]:
        return {"runs": self.runs, "busy": self.busy, "last_pages": self.last_pages}


def wal_room(conn: sqlite3.Connection, cap: float) -> int:
    """The room the cap keeps for the -wal: maintenance checkpoints it every checkpointInterval, but
    behind (or down) it grows to `wal_autocheckpoint` pages (`database.walAutocheckpoint`, 16 MiB by
    default) before the recorder checkpoints it, and the file keeps that size, so the data must leave
    that much of the cap free; at most a quarter of a small cap."""
    pages = conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    return int(min(pages * page_size, cap / 4))


def counted_bytes(conn: sqlite3.Connection, cap: float) -> int:
    """What the cap counts (bytes, `cap` in bytes): the pages in use plus the -wal, the -wal at least
    its room (wal_room)."""
    return _data_bytes(conn) + max(_wal_size(conn), wal_room(conn, cap))


def over_cap(conn: sqlite3.Connection, cap_mib: float) -> bool:
    """The periodic check: does the database (pages in use + -wal) count more than CAP_HIGH_WATER of
    the cap, even after the -wal is checkpointed and truncated?"""
    cap = cap_mib * MIB
    if counted_bytes(conn, cap) <= cap * CAP_HIGH_WATER:
        return False
    _truncate_wal(conn)  # a big -wal alone is not data to drop
    # ...and when the -wal cannot shrink (a reader holds it), dropping data under the low-water mark
    # would not help: the job only runs when it has something to drop.
    return counted_bytes(conn, cap) > cap * CAP_HIGH_WATER and _data_bytes(conn) > _data_target(conn, cap)


def _data_target(conn: sqlite3.Connection, cap: float) -> int:
    """The data the job drops down to: the low-water mark less the -wal (its room, or what could not be
    truncated because a reader holds it, up to the gap between the marks)."""
    wal = max(wal_room(conn, cap), min(_wal_size(conn), int(cap * (CAP_HIGH_WATER - CAP_LOW_WATER))))
    return int(cap * CAP_LOW_WATER) - wal


def _data_bytes(conn: sqlite3.Connection) -> int:
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    return (
        conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
    ) * page_size


# The next rows after a (timestamp, id) with their bytes (estimated), oldest first.
_BODY_BYTES = "COALESCE(length(request_body), 0) + COALESCE(length(response_body), 0)"
_OLD_BODIES = (
    f"SELECT id, {_BODY_BYTES} FROM http_transactions WHERE id > ? AND timestamp < ?"
    " AND (request_body IS NOT NULL OR response_body IS NOT NULL) ORDER BY id LIMIT ?"
)
# The next rows after a (timestamp, id) with their bytes (estimated), oldest first, per kind the job
# drops: transactions, logs, and LLM conversations a unit at a time (SPEC §13.5: a session with its
# subagents' sessions; the assembler's `conversations.unit`), by the unit's last end, with the
# llm_requests rows its conversations are assembled from. A unit goes whole: dropping the rows of a
# session it still shows would make its next assembly number its subagents anew and link a parent's
# calls to the wrong ones (an outside run), and a subagent dropped before its parent leaves a link to
# nothing. A transaction's own llm_requests row stays with its unit.
_NEXT_ROWS = {
    "transactions": f"SELECT timestamp, id, {_BODY_BYTES} + length(url) + COALESCE(length(request_headers), 0)"
    " + COALESCE(length(response_headers), 0) + 200"
    " FROM http_transactions WHERE (timestamp, id) > (?, ?) ORDER BY timestamp, id LIMIT ?",
    "logs": "SELECT timestamp, id, length(destination_host) + length(container_name) + COALESCE(length(reason), 0)"
    " + 120 FROM logs WHERE (timestamp, id) > (?, ?) ORDER BY timestamp, id LIMIT ?",
    "conversations": "SELECT MAX(ended_at) AS last, unit, SUM(length(data)) + 200 * COUNT(*)"
    " + COALESCE((SELECT SUM(length(extraction)) + 300 * COUNT(*) FROM llm_requests WHERE session = unit), 0)"
    " FROM conversations GROUP BY unit HAVING (last, unit) > (?, ?) ORDER BY last, unit LIMIT ?",
}
DROPPED = ("bodies", *_NEXT_ROWS)  # what a size-cap run says it dropped, in this order


def _drop_old_bodies(conn: sqlite3.Connection, target: int, before: float, reader: Reader) -> Iterator[int]:
    """Bodies (set NULL, the rows stay) of transactions older than `before`, oldest first, until the
    data is under `target`. Yields how many rows per batch."""
    after = 0
    drop = f"UPDATE http_transactions SET {_NO_BODIES} WHERE id IN ({{marks}})"
    while (excess := _data_bytes(conn) - target) > 0:
        ids: list[int] = []
        size = 0
        for rid, n in conn.execute(_OLD_BODIES, (after, before, CAP_BODY_BATCH)):
            ids.append(rid)
            size += n
            if size >= excess:  # just enough rows to be under (their bytes, estimated)
                break
        if not ids:
            return
        drop_transactions(conn, ids, drop, reader)
        after = ids[-1]
        yield len(ids)
        time.sleep(0.002)  # let the recorder's batches in


def _delete_rows(conn: sqlite3.Connection, picked: dict[str, list[Any]], reader: Reader) -> None:
    """In the caller's write transaction: the transactions (bodies stored as deltas against theirs made
    self-contained first), logs and conversation units `picked`."""
    tx, logs, units = picked["transactions"], picked["logs"], picked["conversations"]
    if tx:
        detach(conn.execute, tx, reader)
        conn.execute(f"DELETE FROM http_transactions WHERE id IN ({','.join('?' * len(tx))})", tx)
    if logs:
        conn.execute(f"DELETE FROM logs WHERE id IN ({','.join('?' * len(logs))})", logs)
    for unit in units:
        _delete_unit(conn, unit)


def _delete_unit(conn: sqlite3.Connection, root: str) -> None:
    """One unit of linked sessions: its conversations, and the llm_requests rows, references and
    re-assembly marks of its sessions (the root's and its subagents')."""
    from .assembler import unit_children  # (the assembler imports this module)

    members = [root, *unit_children(conn, root)]
    marks = ",".join("?" * len(members))
    conn.execute(
        "UPDATE http_transactions SET conversation_id = NULL"
        " WHERE conversation_id IN (SELECT id FROM conversations WHERE unit = ?)",
        (root,),
    )
    conn.execute("DELETE FROM conversations WHERE unit = ?", (root,))
    conn.execute(f"DELETE FROM llm_requests WHERE session IN ({marks})", members)
    conn.execute(f"DELETE FROM llm_refs WHERE session IN ({marks})", members)
    conn.execute(f"DELETE FROM llm_dirty WHERE session IN ({marks})", members)


def _drop_oldest_rows(conn: sqlite3.Connection, target: int, reader: Reader) -> Generator[dict[str, int], None, bool]:
    """Whole transactions, logs and conversations together in time order (the oldest of any first)
    until the data is under `target`. Yields how many of each per batch; returns whether it stopped
    because none was left (the data still over `target`)."""
    cursor: dict[str, tuple[float, Any]] = {"transactions": (-1.0, 0), "logs": (-1.0, 0), "conversations": (-1.0, "")}
    while (excess := _data_bytes(conn) - target) > 0:
        rows = [
            (ts, what, rid, n)
            for what, sql in _NEXT_ROWS.items()
            for ts, rid, n in conn.execute(sql, (*cursor[what], CAP_ROW_BATCH))
        ]
        if not rows:
            return True
        rows.sort()
        picked: dict[str, list[Any]] = {what: [] for what in _NEXT_ROWS}
        size = 0
        for ts, what, rid, n in rows[:CAP_ROW_BATCH]:
            picked[what].append(rid)
            cursor[what] = (ts, rid)
            size += n
            if size >= excess:
                break
        write_txn(conn, partial(_delete_rows, conn, picked, reader))
        yield {what: len(ids) for what, ids in picked.items()}
        time.sleep(0.002)  # let the recorder's batches in
    return False


def size_cap(conn: sqlite3.Connection, opts: dict[str, Any]) -> Generator[tuple[int, int], None, dict[str, int]]:
    """`retention.maxDatabaseMiB`: bring the database (pages in use + -wal) under CAP_LOW_WATER of
    the cap, in short write transactions: first the bodies of transactions older than CAP_BODY_AGE
    (set NULL, the rows stay), oldest first; then whole transactions (with the LLM rows derived from
    them), logs and conversations together, the oldest of any first, so the newest of each survive.
    Then give the freed pages back (incremental_vacuum in small steps when the file allows it: files
    created by this version, greyproxy/store/db.py; older files keep their size and reuse the free
    pages) and truncate the -wal. Progress is in KiB: (freed, to free), the freed part at most the
    whole (traffic meanwhile can make the data shrink more, or less, than the job's own drops).
    Returns what it dropped (DROPPED), and `exhausted` 1 when it dropped every row it may and the
    data is still over: what is left is in tables it does not drop (rules, pending, sessions...)."""
    cap = float(opts["max_database_mib"]) * MIB
    now = float(opts.get("now") or time.time())
    _truncate_wal(conn)
    start = _data_bytes(conn)
    target = _data_target(conn, cap)
    need = max(0, start - target)
    dropped = dict.fromkeys(DROPPED, 0)
    reader = Reader(conn.execute)
    vacuum = conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
    exhausted = False
    if need:
        for n in _drop_old_bodies(conn, target, now - CAP_BODY_AGE, reader):
            dropped["bodies"] += n
            yield _freed(start, _data_bytes(conn), need)
        rows = _drop_oldest_rows(conn, target, reader)
        i = 0
        while True:
            try:
                batch = next(rows)
            except StopIteration as stop:
                # Not "over the target now": the recorder's batches since the last drop may be.
                exhausted = stop.value
                break
            for what, n in batch.items():
                dropped[what] += n
            yield _freed(start, _data_bytes(conn), need)
            i += 1
            if i % 8 == 0:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()  # the -wal is reused, not grown
    if vacuum:
        while conn.execute("PRAGMA freelist_count").fetchone()[0]:
            # executescript steps the statement to its end: execute() would free a single page per call
            conn.executescript(f"PRAGMA incremental_vacuum({CAP_VACUUM_PAGES});")  # the lock let go between
            # the moved pages are in the -wal and the file shrinks only at a checkpoint: one per step,
            # so file + -wal never hold the old size plus all that moved
            _truncate_wal(conn)
            time.sleep(0.002)
    _truncate_wal(conn)
    end = _data_bytes(conn)
    yield _freed(start, end, need)
    if any(dropped.values()):
        log.warning(
            "database over retention.maxDatabaseMiB (%d MiB): dropped the oldest %d bodies, %d transactions,"
            " %d logs and %d conversations; %.1f MiB of data now (was %.1f), -wal %.1f MiB%s",
            cap // MIB,
            *dropped.values(),
            end / MIB,
            start / MIB,
            _wal_size(conn) / MIB,
            "" if vacuum else "; the file keeps its size (created before auto_vacuum), free pages are reused",
        )
    if exhausted and (tail := _EXHAUSTED.since()) is not None:
        log.error(
            "database over retention.maxDatabaseMiB (%d MiB) with nothing left to drop: %.1f MiB of data in"
            " tables the cap does not drop (rules, pending requests, sessions, credentials, settings); raise"
            " retention.maxDatabaseMiB%s",
            cap // MIB,
            end / MIB,
            tail,
        )
    return dropped | {"exhausted": int(exhausted)}


_EXHAUSTED = Throttle(600.0)  # its error line: the job may run every 30 s while it holds


def _freed(start: int, now: int, need: int) -> tuple[int, int]:
    """The size-cap job's progress in KiB: (freed so far, at most the whole; to free)."""
    return min(need, max(0, start - now)) // 1024, need // 1024


JOBS: dict[str, JobFn] = {"prune": prune, "size-cap": size_cap}


def register(name: str, fn: JobFn) -> None:
    JOBS[name] = fn
