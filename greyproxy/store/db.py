"""Opening the database: WAL, busy timeout, foreign keys, migrations applied once under a lock."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path

import peewee

from . import migrations

log = logging.getLogger("greyproxy.store")

# Every model binds to this proxy; open_database() points it at the real file.
database = peewee.DatabaseProxy()

# Binding a None or a bytes value costs Python 3.11's sqlite3 an AttributeError built and thrown away
# per value: it looks the value's type up in the adapter registry, then `__adapt__` on its protocol
# type, whose failed look-up formats the message (433 ns per None bound against 91 for an int; the
# recorder binds 13 None values per proxied request: 11 of a transaction row, 2 of a log row). A
# type in the registry is adapted at once: {}.get(None) gives None back, bytes(b) gives b itself, both
# C calls (183 and 448 ns against 433 and 794). The values bound are the same (NULL, the BLOB).
sqlite3.register_adapter(type(None), {}.get)  # type: ignore[arg-type]  # dict.get: overloaded
sqlite3.register_adapter(bytes, bytes)

# The -wal's pages a committing connection checkpoints past (SQLite's automatic checkpoint, which
# runs inside that COMMIT). Maintenance checkpoints the -wal every `database.checkpointInterval`
# (services/maintenance/jobs.py, WalCheckpointer), long before this: it is the bound when maintenance
# is down or behind (`database.walAutocheckpoint`, the same default). SQLite's own default is 1 000.
WAL_AUTOCHECKPOINT = 4_000

# Per-connection settings (busy_timeout first, so the others wait for a lock). WAL is not here:
# it is a property of the file, set once in open_database() with a retry, because switching a
# fresh file to WAL can fail at once with "database is locked" while another process opens it.
PRAGMAS = {
    "busy_timeout": 10_000,
    "foreign_keys": 1,
    "synchronous": "normal",
    "cache_size": -16_000,
    "temp_store": "memory",
    "wal_autocheckpoint": WAL_AUTOCHECKPOINT,
}


def open_database(
    path: Path | str, migrate: bool = True, wal_autocheckpoint: int | None = None
) -> peewee.SqliteDatabase:
    """Open (creating if needed) the database file and bring its schema up to date.
    `wal_autocheckpoint`: pages (`database.walAutocheckpoint`; default WAL_AUTOCHECKPOINT)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _private_file(path)
    pragmas = PRAGMAS if wal_autocheckpoint is None else {**PRAGMAS, "wal_autocheckpoint": int(wal_autocheckpoint)}
    db = peewee.SqliteDatabase(str(path), pragmas=pragmas, check_same_thread=False, autoconnect=True)
    database.initialize(db)
    db.connect(reuse_if_open=True)
    if db.execute_sql("PRAGMA page_count").fetchone()[0] == 0:
        # A new file: pages freed by the size cap (services/maintenance/jobs.py) can be given back
        # with PRAGMA incremental_vacuum. Only possible before the first table; older files stay NONE.
        db.execute_sql("PRAGMA auto_vacuum = INCREMENTAL")
    _enable_wal(db)  # after the chmod: SQLite gives the -wal/-shm files the main file's mode
    for suffix in ("-wal", "-shm"):
        side = Path(f"{path}{suffix}")
        if side.exists():
            _private_file(side, create=False)
    if migrate:
        apply_migrations(db)
    return db


def _private_file(path: Path, create: bool = True) -> None:
    """The database holds logs and transactions: readable by its owner only (0600), created so
    from the start rather than fixed after, and fixed when an existing file is looser."""
    try:
        if create:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(path, mode & 0o700)
    except OSError as exc:
        log.warning("database file %s: cannot make it private (0600): %s", path, exc)


def _enable_wal(db: peewee.SqliteDatabase) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            mode = db.execute_sql("PRAGMA journal_mode = wal").fetchone()[0]
            break
        except peewee.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    if str(mode).lower() != "wal":
        log.warning("database %s: journal_mode is %s, not wal", db.database, mode)


def apply_migrations(db: peewee.SqliteDatabase) -> list[int]:
    """Apply pending numbered migrations. BEGIN IMMEDIATE takes SQLite's write lock, so when
    several processes start at once exactly one applies each migration; the others wait, then
    see it recorded and skip it."""
    applied: list[int] = []
    conn = db.connection()
    deadline = time.monotonic() + 30
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            break
        except peewee.OperationalError as exc:  # pragma: no cover - lock contention at start
            if time.monotonic() > deadline:
                raise
            log.debug("waiting for the migration lock: %s", exc)
            time.sleep(0.05)
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for version, name, statements in migrations.MIGRATIONS:
            if version in done:
                continue
            for stmt in statements:
                if callable(stmt):
                    stmt(conn)
                else:
                    conn.execute(stmt)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (version, name, time.time()),
            )
            applied.append(version)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    if applied:
        log.info("applied migrations %s", applied)
    return applied


def current_version(db: peewee.SqliteDatabase) -> int:
    row = db.execute_sql("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
    return int(row[0])
