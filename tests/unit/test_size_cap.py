"""retention.maxDatabaseMiB (SPEC §15): over CAP_HIGH_WATER of the cap, the size-cap job drops the
bodies of old transactions first, then the oldest transactions and logs together by timestamp, down
to CAP_LOW_WATER, and gives the pages back (services/maintenance/jobs.py)."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from greyproxy.config import ConfigError, load_config
from greyproxy.store import open_database
from greyproxy.store.db import WAL_AUTOCHECKPOINT
from services.maintenance.jobs import (
    CAP_HIGH_WATER,
    JobState,
    CAP_LOW_WATER,
    MIB,
    WalCheckpointer,
    _data_bytes,
    counted_bytes,
    over_cap,
    size_cap,
    used_bytes,
    wal_room,
)
from services.maintenance.service import JobRunner, dropped_any

_INSERT = (
    "INSERT INTO http_transactions (timestamp, container_name, destination_host, destination_port, method,"
    " url, response_body, response_body_codec, response_body_charset, response_body_size)"
    " VALUES (?, 'c', 'h', 80, 'GET', ?, ?, ?, NULL, ?)"
)


def _fill(conn: sqlite3.Connection, n: int, body: int, start: int = 0) -> None:
    conn.execute("BEGIN")
    for i in range(start, start + n):
        data = os.urandom(body) if body else None
        conn.execute(_INSERT, (1000.0 + i, f"http://h/{i}", data, 0 if body else None, body))
    conn.execute("COMMIT")


def _run(conn: sqlite3.Connection, mib: float) -> list[tuple[int, int]]:
    return list(size_cap(conn, {"max_database_mib": mib}))


def test_oldest_bodies_go_first_and_the_rows_stay(tmp_path: Path) -> None:
    db = open_database(tmp_path / "g.db")
    conn = db.connection()
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # a new file: incremental
    _fill(conn, 300, 8192)  # ~2.5 MiB of incompressible bodies
    cap = 1.2  # MiB: room for the 300 rows without their bodies under the low-water mark
    assert over_cap(conn, cap)
    file_before = os.path.getsize(tmp_path / "g.db")
    steps = _run(conn, cap)
    assert steps and steps[-1][0] > 0
    rows = conn.execute(
        "SELECT id, response_body IS NOT NULL, response_body_size FROM http_transactions ORDER BY id"
    ).fetchall()
    assert len(rows) == 300  # every row kept: bodies were enough
    kept = [has for _id, has, _size in rows]
    first_kept = kept.index(1)
    assert not any(kept[:first_kept]) and all(kept[first_kept:])  # the oldest went, the newest stay
    assert 0 < first_kept < 300 and rows[0][2] == 8192  # the size of a dropped body is still known
    assert used_bytes(conn) <= CAP_LOW_WATER * cap * MIB
    assert os.path.getsize(tmp_path / "g.db") < file_before / 2  # incremental_vacuum gave the pages back
    assert not over_cap(conn, cap)
    assert _run(conn, cap)[-1] == (0, 0)  # under the cap: nothing to do
    db.close()


def test_then_the_oldest_rows(tmp_path: Path) -> None:
    db = open_database(tmp_path / "g.db")
    conn = db.connection()
    _fill(conn, 4000, 0)  # rows without bodies: only deleting rows helps
    _fill(conn, 20, 2048, start=4000)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    cap = _data_bytes(conn) * 0.7 / (CAP_LOW_WATER - 0.25) / MIB  # keeps ~70 % (its -wal room: a quarter)
    _run(conn, cap)
    ids = [r[0] for r in conn.execute("SELECT id FROM http_transactions ORDER BY id")]
    assert ids and ids == list(range(ids[0], 4021))  # the oldest rows went, the rest are whole
    assert conn.execute("SELECT COUNT(*) FROM http_transactions WHERE response_body IS NOT NULL").fetchone()[0] == 0
    assert used_bytes(conn) <= CAP_LOW_WATER * cap * MIB
    db.close()


_LOG = (
    "INSERT INTO logs (timestamp, container_name, destination_host, destination_port, method, result, reason)"
    " VALUES (?, 'c', ?, 443, 'CONNECT', 'allowed', ?)"
)


def _fill_recent(conn: sqlite3.Connection, seconds: int, now: float) -> None:
    """`seconds` of recent traffic: each second 2 transactions with bodies and 40 logs."""
    conn.execute("BEGIN")
    for t in range(seconds):
        ts = now - seconds + t
        for j in range(2):
            conn.execute(_INSERT, (ts + j / 10, f"http://h/{t}/{j}", os.urandom(3000), 0, 3000))
        for j in range(40):
            conn.execute(_LOG, (ts + j / 100, f"host{t}.example", "r" * 100))
    conn.execute("COMMIT")


def test_the_newest_transactions_and_logs_stay_the_oldest_of_both_go(tmp_path: Path) -> None:
    db = open_database(tmp_path / "g.db")
    conn = db.connection()
    now = time.time()
    _fill_recent(conn, 600, now)  # ten minutes: logs hold about as many bytes as transactions
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    cap = used_bytes(conn) / MIB / 1.5
    assert over_cap(conn, cap)
    steps = _run(conn, cap)
    assert steps[-1][0] > 0
    assert used_bytes(conn) <= CAP_LOW_WATER * cap * MIB  # data + -wal under the low-water mark
    assert os.path.getsize(tmp_path / "g.db") + os.path.getsize(tmp_path / "g.db-wal") <= CAP_LOW_WATER * cap * MIB
    assert not over_cap(conn, cap)
    tx_lo, tx_hi, tx_n, no_body = conn.execute(
        "SELECT MIN(timestamp), MAX(timestamp), COUNT(*), SUM(response_body IS NULL) FROM http_transactions"
    ).fetchone()
    log_lo, log_hi, log_n = conn.execute("SELECT MIN(timestamp), MAX(timestamp), COUNT(*) FROM logs").fetchone()
    assert tx_hi > now - 1.5 and log_hi > now - 1.5  # the newest of both kept
    assert tx_lo > now - 600 + 60 and log_lo > now - 600 + 60  # the oldest of both gone...
    assert abs(tx_lo - log_lo) < 2  # ...up to the same moment: one cut across both tables
    assert no_body == 0  # recent transactions keep their bodies: whole rows went
    # what is left is whole: every row from the cut on
    assert tx_n == conn.execute("SELECT COUNT(*) FROM http_transactions WHERE timestamp >= ?", (tx_lo,)).fetchone()[0]
    assert 0 < tx_n < 1200 and 0 < log_n < 24000
    db.close()


def test_a_run_that_traffic_outpaces_still_says_it_dropped_and_runs_again(tmp_path: Path) -> None:
    """SPEC §15 (retention.maxDatabaseMiB). Under heavy traffic the recorder refills what a run frees while it runs: the data at its end
    can be larger than at its start. The run still dropped rows, so maintenance checks again at once
    (before, such a run counted as "could free nothing" and the cap paused for 30 s while the file
    grew past it many times over). Its progress never says more freed than there was to free."""
    db = open_database(tmp_path / "g.db")
    conn = db.connection()
    _fill(conn, 300, 8192)
    cap = 1.2
    writer = open_database(tmp_path / "g.db").connection()  # a second writer, as the recorder is
    writer.execute("CREATE TABLE growth (b BLOB)")  # data the job does not drop: it outgrows the drops
    job = size_cap(conn, {"max_database_mib": cap})
    steps: list[tuple[int, int]] = []
    while True:
        try:
            steps.append(next(job))
        except StopIteration as end:
            dropped = end.value
            break
        if len(steps) <= 3:
            writer.execute("INSERT INTO growth VALUES (?)", (os.urandom(1 << 20),))
    assert dropped["bodies"] == 300 and dropped["transactions"] == 300
    assert dropped["exhausted"] == 1  # every row it may drop is gone and the growth is still there
    assert all(0 <= freed <= whole for freed, whole in steps)
    assert steps[-1][0] == 0  # the data did not shrink: before, that alone paused the cap for 30 s
    writer.execute("DROP TABLE growth")

    class _Rt:
        class publisher:
            published: list[dict] = []

            @classmethod
            def publish(cls, topic: str, data: dict) -> None:
                cls.published.append(data)

    async def run_in_runner() -> JobState:
        runner = JobRunner(_Rt(), db, ThreadPoolExecutor(max_workers=1))
        runner.start("size-cap", {"max_database_mib": cap})
        while runner.states["size-cap"].running:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # its last progress event
        return runner.states["size-cap"]

    _fill(conn, 300, 8192, start=300)
    state = asyncio.run(asyncio.wait_for(run_in_runner(), 30))
    assert state.error is None and state.extra["result"]["bodies"] > 0  # the job's return, kept
    assert dropped_any(state)
    assert _Rt.publisher.published[-1]["done"]
    assert all(d["processed"] <= d["total"] for d in _Rt.publisher.published)
    assert state.extra["result"]["exhausted"] == 0
    state.extra["result"] = {"bodies": 0, "transactions": 0, "logs": 0, "conversations": 0, "exhausted": 0}
    assert not dropped_any(state)  # nothing it may drop: then the 30 s backoff...
    state.extra["result"] = {"bodies": 5, "transactions": 40, "logs": 0, "conversations": 0, "exhausted": 1}
    assert not dropped_any(state)  # ...and when it dropped every row it may and is still over (not at once
    # again: it would drop the newest rows as they arrive)
    db.close()


def test_the_check_starts_at_the_high_water_mark(tmp_path: Path) -> None:
    db = open_database(tmp_path / "g.db")
    conn = db.connection()
    _fill_recent(conn, 100, time.time())
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = _data_bytes(conn)
    # a small cap keeps a quarter of itself for the -wal: counted = data + cap / 4
    under, over = data / (CAP_HIGH_WATER - 0.02 - 0.25), data / (CAP_HIGH_WATER + 0.02 - 0.25)
    assert wal_room(conn, under) == under // 4 and counted_bytes(conn, under) < CAP_HIGH_WATER * under
    assert not over_cap(conn, under / MIB)  # under 85 % of the cap: nothing
    assert over_cap(conn, over / MIB)  # just over 85 %, still under the cap itself
    assert counted_bytes(conn, over) < over
    # a big cap keeps the -wal's full room: wal_autocheckpoint pages (database.walAutocheckpoint)
    assert wal_room(conn, 1 << 30) == WAL_AUTOCHECKPOINT * conn.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    db = open_database(tmp_path / "g.db", wal_autocheckpoint=500)
    assert wal_room(db.connection(), 1 << 30) == 500 * db.connection().execute("PRAGMA page_size").fetchone()[0]
    db.close()


def test_an_old_file_without_auto_vacuum_is_capped_by_its_pages_in_use(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE x (a)")  # auto_vacuum NONE, as every file before migration 6
    raw.close()
    db = open_database(path)
    conn = db.connection()
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    _fill(conn, 300, 8192)
    _run(conn, 1)
    assert used_bytes(conn) <= CAP_LOW_WATER * MIB and not over_cap(conn, 1)  # the free pages are reused
    db.close()


def test_config_key(tmp_path: Path) -> None:
    for bad in ("0", "-1", "1.5", "big"):
        cfg = tmp_path / f"c{bad}.yaml"
        cfg.write_text(f"retention:\n  maxDatabaseMiB: {bad}\n")
        with pytest.raises(ConfigError, match="maxDatabaseMiB"):
            load_config(cfg)
    good = tmp_path / "g.yaml"
    good.write_text("retention:\n  maxDatabaseMiB: 100\n")
    assert load_config(good).section("retention")["maxDatabaseMiB"] == 100


def test_database_checkpoint_settings(tmp_path: Path) -> None:
    """database.checkpointInterval: seconds, 0 = off; database.walAutocheckpoint: pages, > 0 (0 would
    leave the -wal unbounded whenever maintenance is down)."""
    assert load_config(None).section("database") == {"checkpointInterval": 0.5, "walAutocheckpoint": WAL_AUTOCHECKPOINT}
    for key, bad in (("checkpointInterval", "-1"), ("walAutocheckpoint", "0"), ("walAutocheckpoint", "1.5")):
        cfg = tmp_path / f"c{key}{bad}.yaml"
        cfg.write_text(f"database:\n  {key}: {bad}\n")
        with pytest.raises(ConfigError, match=key):
            load_config(cfg)
    good = tmp_path / "g.yaml"
    good.write_text("database:\n  checkpointInterval: 0\n  walAutocheckpoint: 500\n")
    assert load_config(good).section("database") == {"checkpointInterval": 0, "walAutocheckpoint": 500}


def test_rows_stored_before_migration_6_read_as_their_text(tmp_path: Path) -> None:
    """A TEXT body with NULL codec (what every row stored before this version is) reads as that text
    through the API's lookup and the HAR export, next to a new BLOB row."""
    from greyproxy import har
    from greyproxy.bodies import pack
    from greyproxy.capture import transaction_json
    from greyproxy.store.transactions import get_transaction

    db = open_database(tmp_path / "g.db")
    conn = db.connection()
    conn.execute(
        "INSERT INTO http_transactions (timestamp, container_name, destination_host, destination_port,"
        " method, url, response_body, response_body_size, response_content_type)"
        " VALUES (1, 'c', 'h', 80, 'GET', 'http://h/old', 'caf\ufffd text', 12, 'text/plain')"
    )
    p = pack(b"\xff\xfe binary", "text/plain")
    conn.execute(_INSERT, (2.0, "http://h/new", p.blob, p.codec, len(b"\xff\xfe binary")))
    old, new = get_transaction(1), get_transaction(2)
    assert old is not None and new is not None
    assert transaction_json(old, include_bodies=True)["response_body"] == "caf\ufffd text"
    assert har.entry(old)["response"]["content"]["text"] == "caf\ufffd text"
    item = transaction_json(new, include_bodies=True)
    assert (item["response_body"], item["response_body_encoding"]) == ("//4gYmluYXJ5", "base64")
    content = har.entry(new)["response"]["content"]
    assert content["text"] == "//4gYmluYXJ5" and content["encoding"] == "base64"
    db.close()


def test_maintenance_checkpoints_so_that_the_next_write_starts_the_wal_over(tmp_path: Path) -> None:
    """A -wal started over is written from its beginning: its file, which keeps its size, does not grow."""
    db = open_database(tmp_path / "g.db")
    writer = db.connection()
    size = lambda: os.path.getsize(tmp_path / "g.db-wal")  # noqa: E731
    other = sqlite3.connect(tmp_path / "g.db", isolation_level=None, timeout=10)  # maintenance's connection
    wal = WalCheckpointer(other)
    assert wal.run() is True  # the migrations' pages
    assert wal.run() is False  # unchanged since: a stat, no checkpoint
    _fill(writer, 200, 2048, start=10_000)
    high = size()
    assert wal.run() is True and wal.busy == 0 and wal.last_pages > 100
    assert wal.runs == 2 and wal.stats() == {"runs": 2, "busy": 0, "last_pages": wal.last_pages}
    _fill(writer, 200, 2048, start=20_000)
    assert size() < 1.1 * high  # written over from the beginning (a few pages more: the tree grew), not appended

    # A reader on the -wal: the second step waits for it at most WAL_RESTART_WAIT_MS and gives up;
    # the -wal grows until a run after the reader is done.
    reader = sqlite3.connect(tmp_path / "g.db", isolation_level=None, timeout=10)
    reader.execute("BEGIN")
    assert reader.execute("SELECT COUNT(*) FROM http_transactions").fetchone()[0] == 400
    t0 = time.monotonic()
    assert wal.run() is True and wal.busy == 1
    assert time.monotonic() - t0 < 1
    _fill(writer, 200, 2048, start=30_000)
    assert size() > 1.8 * high  # appended: not started over
    assert reader.execute("SELECT COUNT(*) FROM http_transactions").fetchone()[0] == 400  # still its snapshot
    reader.execute("COMMIT")
    high = size()
    assert wal.run() is True and wal.busy == 1
    _fill(writer, 200, 2048, start=40_000)
    assert size() == high  # well within what it already had
    assert writer.execute("SELECT COUNT(*) FROM http_transactions").fetchone()[0] == 800
    assert reader.execute("SELECT COUNT(*) FROM http_transactions").fetchone()[0] == 800
    reader.close()
    other.close()
    db.close()
