"""The SQLite store: pragmas, numbered migrations applied exactly once even when several
processes open a fresh database at the same moment."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path

import peewee as pw
import pytest

from greyproxy.store import migrations, open_database
from greyproxy.store.db import apply_migrations, current_version

WORKERS = 4


def _open_at_barrier(path: str, barrier, results) -> None:  # runs in a child process
    try:
        from greyproxy.store import open_database as open_db

        barrier.wait(10)
        db = open_db(path)
        db.execute_sql("SELECT COUNT(*) FROM rules").fetchone()
        db.close()
        results.put(("ok", os.getpid()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def _migration_counts(path: Path) -> tuple[list[tuple[int, int]], int, int]:
    con = sqlite3.connect(path)
    try:
        versions = con.execute("SELECT version, COUNT(*) FROM schema_migrations GROUP BY version").fetchall()
        builtin = con.execute("SELECT COUNT(*) FROM rules WHERE source = 'builtin'").fetchone()[0]
        meta = con.execute("SELECT COUNT(*) FROM meta").fetchone()[0]
        return versions, builtin, meta
    finally:
        con.close()


def _race_once(path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(WORKERS)
    results = ctx.Queue()
    procs = [ctx.Process(target=_open_at_barrier, args=(str(path), barrier, results)) for _ in range(WORKERS)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=30) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    assert [o for o in outcomes if o[0] != "ok"] == [], outcomes
    assert all(p.exitcode == 0 for p in procs)


def test_concurrent_first_open_migrates_once(tmp_path: Path) -> None:
    # The race is short: run it on several fresh files to give a regression a chance to show.
    for round_ in range(25):
        path = tmp_path / f"fresh{round_}.db"
        _race_once(path)
        versions, builtin, meta = _migration_counts(path)
        assert versions == [(v, 1) for v, _name, _stmts in migrations.MIGRATIONS], round_
        assert builtin == 3, round_
        assert meta == 3, round_  # rules_version, settings_version, credentials_version


def test_builtin_rules_and_counters(tmp_path: Path) -> None:
    db = open_database(tmp_path / "g.db")
    try:
        rows = db.execute_sql(
            "SELECT container_pattern, destination_pattern, port_pattern, action, source, created_by"
            " FROM rules ORDER BY id"
        ).fetchall()
        assert rows == [("*", h, "*", "allow", "builtin", "builtin") for h in ("localhost", "127.0.0.1", "::1")]
        assert current_version(db) == max(v for v, _n, _s in migrations.MIGRATIONS)
        version = db.execute_sql("SELECT value FROM meta WHERE key = 'rules_version'").fetchone()[0]
        db.execute_sql(
            "INSERT INTO rules (container_pattern, destination_pattern, action, created_at)"
            " VALUES ('c', 'd', 'deny', 0)"
        )
        assert db.execute_sql("SELECT value FROM meta WHERE key = 'rules_version'").fetchone()[0] == version + 1
        with pytest.raises(pw.IntegrityError):  # the CHECK constraint
            db.execute_sql(
                "INSERT INTO rules (container_pattern, destination_pattern, action, created_at)"
                " VALUES ('c', 'd', 'maybe', 0)"
            )
    finally:
        db.close()


def test_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    db = open_database(path)
    try:
        assert db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute_sql("PRAGMA foreign_keys").fetchone()[0] == 1
        assert db.execute_sql("PRAGMA busy_timeout").fetchone()[0] >= 1000
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        for side in (Path(f"{path}-wal"), Path(f"{path}-shm")):  # they hold data too
            assert side.exists() and stat.S_IMODE(os.stat(side).st_mode) == 0o600, side
        # peewee connects once per thread: a worker thread's connection gets the same settings.
        seen: list = []
        worker = threading.Thread(
            target=lambda: seen.extend(
                db.execute_sql(f"PRAGMA {p}").fetchone()[0] for p in ("journal_mode", "foreign_keys", "busy_timeout")
            )
        )
        worker.start()
        worker.join(10)
        assert seen[:2] == ["wal", 1] and seen[2] >= 1000, seen
    finally:
        db.close()
    # WAL is a property of the file: a plain connection sees it too.
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        con.close()


def test_reopen_applies_nothing(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    open_database(path).close()
    db = open_database(path)
    try:
        assert apply_migrations(db) == []
        versions, builtin, _meta = _migration_counts(path)
        assert versions == [(v, 1) for v, _n, _s in migrations.MIGRATIONS]
        assert builtin == 3
    finally:
        db.close()


def test_migration_waits_for_a_writer(tmp_path: Path) -> None:
    """A database write-locked by another process: opening waits for the lock instead of failing."""
    path = tmp_path / "g.db"
    open_database(path).close()
    ctx = multiprocessing.get_context("fork")
    locked, release = ctx.Event(), ctx.Event()

    def hold_lock() -> None:
        con = sqlite3.connect(path, isolation_level=None)
        con.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(10)
        time.sleep(0.3)
        con.execute("COMMIT")
        con.close()

    holder = ctx.Process(target=hold_lock)
    holder.start()
    try:
        assert locked.wait(10)
        release.set()
        t0 = time.monotonic()
        db = open_database(path)
        try:
            assert apply_migrations(db) == []
        finally:
            db.close()
        assert time.monotonic() - t0 < 10
    finally:
        holder.join(10)
        if holder.is_alive():
            holder.kill()
    assert holder.exitcode == 0


def test_log_counts_migration_counts_existing_rows(tmp_path: Path) -> None:
    """Migration 3 on a database that already holds logs starts its counts from those rows."""
    path = tmp_path / "g.db"
    open_database(path).close()
    con = sqlite3.connect(path, isolation_level=None)
    try:
        # Back to "before migration 3", with rows written meanwhile.
        for stmt in (
            "DROP TRIGGER IF EXISTS log_counts_ins",  # gone since migration 10 (the recorder counts)
            "DROP TRIGGER log_counts_del",
            "DROP TRIGGER log_counts_upd",
            "DROP TABLE log_counts",
            "DELETE FROM schema_migrations WHERE version = 3",
        ):
            con.execute(stmt)
        con.executemany(
            "INSERT INTO logs (timestamp, container_name, destination_host, destination_port, method, result)"
            " VALUES (?, ?, 'h', 1, 'HTTP', ?)",
            [(float(i), f"c{i % 2}", "allowed" if i % 3 else "blocked") for i in range(30)],
        )
    finally:
        con.close()
    db = open_database(path)  # applies migration 3 again
    try:
        assert current_version(db) >= 3
        got = db.execute_sql("SELECT container_name, result, n FROM log_counts ORDER BY 1, 2").fetchall()
        want = db.execute_sql(
            "SELECT container_name, result, COUNT(*) FROM logs GROUP BY 1, 2 ORDER BY 1, 2"
        ).fetchall()
        assert got == want and sum(r[2] for r in got) == 30
    finally:
        db.close()


def test_rules_stored_before_are_rewritten_as_they_match(tmp_path: Path) -> None:
    """Migrations 15 and 16: destinations stored as typed before the API normalised them (`Example.COM.`,
    `[::1]`) are rewritten in the form they match in, so the duplicate guard finds a new `example.com`
    equal to them; a pattern the API would now refuse is left as it was."""
    path = tmp_path / "r.db"
    open_database(path).close()
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("DELETE FROM schema_migrations WHERE version >= 15")
        con.executemany(
            "INSERT INTO rules (container_pattern, destination_pattern, port_pattern, action, created_at)"
            " VALUES ('old', ?, '*', 'allow', 0)",
            [
                ("Example.COM.",),
                ("[::1]",),
                ("**.Sub.Example.org",),
                ("host.test:443",),
                ("10.0.0.1/8",),
                ("::ffff:192.0.2.0/120",),
                ("fe80::1%eth0",),
            ],
        )
        con.execute("UPDATE rules SET port_pattern = '443,80,80' WHERE destination_pattern = '[::1]'")
    finally:
        con.close()
    db = open_database(path)
    try:
        got = [
            r[0]
            for r in db.execute_sql("SELECT destination_pattern FROM rules WHERE container_pattern = 'old' ORDER BY id")
        ]
        assert got == [
            "example.com",
            "::1",
            "**.sub.example.org",
            "host.test:443",
            "10.0.0.0/8",
            "192.0.2.0/24",
            "fe80::1",
        ]
        ports = db.execute_sql(
            "SELECT port_pattern FROM rules WHERE destination_pattern = '::1' AND container_pattern = 'old'"
        )
        assert [r[0] for r in ports] == ["80,443"]
        assert current_version(db) == max(v for v, _n, _s in migrations.MIGRATIONS)
    finally:
        db.close()
