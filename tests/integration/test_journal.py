"""The journal (proxy -> recorder): nothing lost while the recorder is away, nothing stored twice
when it is killed with -9 mid-batch. Real recorder processes, an in-test JournalWriter."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from bus.journal import JournalWriter
from bus.reqrep import ServiceUnavailable, call_sync
from conftest import ServiceProcess, service_env, wait_for, write_config

pytestmark = pytest.mark.stack

N = 50_000
CONTAINER = "journal-test"
ENDPOINTS = ("pub", "sub", "journal", "proxyControl", "recorderControl", "maintenanceControl")


class RecorderSetup:
    """A config whose bus endpoints are ipc sockets in a short tmp dir, and a data dir beside it."""

    def __init__(self, root: Path, runner) -> None:
        self.root = root
        self.runner = runner
        self.data_dir = root / "data"
        self.cfg_path = root / "cfg.yaml"
        self.bus = {k: f"ipc://{root}/{k}.sock" for k in ENDPOINTS}
        write_config(self.cfg_path, {"bus": self.bus})
        self.env = service_env(self.data_dir)
        self.db_path = self.data_dir / "greyproxy.db"

    def start(self) -> ServiceProcess:
        return self.runner("recorder", self.cfg_path, self.env, self.root / "recorder.log")

    def wait_ready(self, rec: ServiceProcess, timeout: float = 15) -> None:
        def ping():
            if not rec.alive():
                raise AssertionError(f"recorder exited\n{rec.logs()}")
            try:
                return call_sync(self.bus["recorderControl"], "recorder", "ping", timeout=0.3, retries=1)
            except ServiceUnavailable:
                return None

        try:
            wait_for(ping, timeout, interval=0.05, message="recorder answering ping")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{rec.logs()}") from None

    def rows(self) -> tuple[int, int]:
        """(log rows, distinct markers) written for this test."""
        con = sqlite3.connect(self.db_path, timeout=10)
        try:
            return con.execute(
                "SELECT COUNT(*), COUNT(DISTINCT reason) FROM logs WHERE container_name = ?", (CONTAINER,)
            ).fetchone()
        finally:
            con.close()


@pytest.fixture
def rec_setup(short_tmp: Path, service_runner) -> RecorderSetup:
    return RecorderSetup(short_tmp, service_runner)


def _record(i: int) -> dict:
    return {
        "reason": f"r{i}",
        "container_name": CONTAINER,
        "destination_host": "h",
        "destination_port": 1,
        "method": "HTTP",
        "result": "allowed",
    }


class WriterHarness:
    """A JournalWriter running as a task on its own zmq context."""

    def __init__(self, endpoint: str, ack_timeout: float = 1.0) -> None:
        self.ctx = zmq.asyncio.Context()
        self.writer = JournalWriter(endpoint, ack_timeout=ack_timeout, ctx=self.ctx)
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> JournalWriter:
        self.task = asyncio.create_task(self.writer.run())
        return self.writer

    async def __aexit__(self, *exc) -> None:
        assert self.task is not None
        self.task.cancel()
        # The writer must stop when cancelled (the proxy's shutdown depends on it).
        done, _ = await asyncio.wait({self.task}, timeout=5)
        self.ctx.destroy(linger=0)
        assert done, "JournalWriter.run() ignored its cancellation"
        assert self.task.cancelled() or self.task.exception() is None


def test_records_appended_while_recorder_is_down_all_arrive(rec_setup: RecorderSetup) -> None:
    # A first run creates the database and leaves its (now stale) ipc socket files behind.
    rec = rec_setup.start()
    rec_setup.wait_ready(rec)
    assert rec.stop() == 0, rec.logs()

    async def scenario() -> tuple[bool, JournalWriter]:
        async with WriterHarness(rec_setup.bus["journal"]) as writer:
            for i in range(N):
                writer.append("log", _record(i))
            await asyncio.sleep(0.5)  # the writer tries while nobody listens
            assert writer.acked == 0
            assert writer.stats()["queued"] + writer.stats()["inflight"] == N
            assert writer.dropped == 0
            rec_setup.start()
            ok = await writer.flush(60)
            return ok, writer

    t0 = time.monotonic()
    ok, writer = asyncio.run(scenario())
    assert ok, f"flush timed out: {writer.stats()}"
    assert writer.acked == N
    assert rec_setup.rows() == (N, N)
    print(f"\n{N} records delivered after the recorder started in {time.monotonic() - t0:.1f}s")


def test_recorder_killed_mid_batch_loses_and_duplicates_nothing(rec_setup: RecorderSetup) -> None:
    rec = rec_setup.start()
    rec_setup.wait_ready(rec)
    killed_at: dict[str, int] = {}

    async def scenario() -> tuple[bool, JournalWriter]:
        async with WriterHarness(rec_setup.bus["journal"]) as writer:
            for i in range(N):
                writer.append("log", _record(i))
            deadline = time.monotonic() + 30
            while writer.acked == 0:
                assert time.monotonic() < deadline, f"no ack in 30s\n{rec.logs()}"
                await asyncio.sleep(0.001)
            os.kill(rec.pid, signal.SIGKILL)
            killed_at["acked"] = writer.acked
            killed_at["inflight"] = writer.stats()["inflight"]
            await asyncio.to_thread(rec.proc.wait, 10)
            rec_setup.start()
            ok = await writer.flush(60)
            return ok, writer

    ok, writer = asyncio.run(scenario())
    assert rec.proc.returncode == -signal.SIGKILL
    print(f"\nkilled at {killed_at}, resent {writer.resent}")
    assert 0 < killed_at["acked"] < N, killed_at
    assert killed_at["inflight"] > 0, killed_at  # batches were on their way when it died
    assert ok, f"flush timed out: {writer.stats()}"
    assert writer.resent > 0  # what was in flight was sent again ...
    assert rec_setup.rows() == (N, N)  # ... and stored exactly once


def test_recorder_frozen_past_ack_timeout_stores_resends_once(rec_setup: RecorderSetup) -> None:
    """Batches the recorder already holds are resent when it is frozen past the ack timeout; once it
    runs again it sees both copies, and must store each record once."""
    n = 20_000
    rec = rec_setup.start()
    rec_setup.wait_ready(rec)

    async def scenario() -> tuple[bool, JournalWriter, int]:
        async with WriterHarness(rec_setup.bus["journal"], ack_timeout=0.5) as writer:
            for i in range(n):
                writer.append("log", _record(i))
            deadline = time.monotonic() + 30
            while writer.acked == 0:
                assert time.monotonic() < deadline, f"no ack in 30s\n{rec.logs()}"
                await asyncio.sleep(0.001)
            os.kill(rec.pid, signal.SIGSTOP)
            try:
                deadline = time.monotonic() + 10
                while writer.resent == 0:
                    assert time.monotonic() < deadline, "the writer never resent to a frozen recorder"
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)
            finally:
                os.kill(rec.pid, signal.SIGCONT)
            ok = await writer.flush(60)
            return ok, writer, writer.resent

    ok, writer, resent = asyncio.run(scenario())
    assert ok, f"flush timed out: {writer.stats()}"
    assert resent > 0
    assert rec.alive(), rec.logs()
    assert rec_setup.rows() == (n, n)


def test_apply_records_is_idempotent_on_record_id(tmp_path: Path) -> None:
    from greyproxy.store import open_database
    from services.recorder.apply import apply_records

    db = open_database(tmp_path / "t.db")
    try:
        conn = db.connection()
        records = [(f"id-{i}", "log", _record(i)) for i in range(100)]
        events = apply_records(conn, records)
        assert len(events) == 100
        assert apply_records(conn, records) == []  # a resend after a lost ack
        # A batch mixing old and new ids writes only the new ones.
        mixed = records[50:] + [(f"id-{i}", "log", _record(i)) for i in range(100, 120)]
        assert len(apply_records(conn, mixed)) == 20
        count, distinct = conn.execute("SELECT COUNT(*), COUNT(DISTINCT reason) FROM logs").fetchone()
        assert (count, distinct) == (120, 120)
        assert conn.execute("SELECT SUM(hi - lo + 1) FROM journal_ranges").fetchone()[0] == 120
        # A malformed record is dropped (but marked applied) without blocking its batch-mates.
        bad = [("bad-1", "log", {"container_name": "x"}), ("ok-1", "log", _record(999))]
        assert len(apply_records(conn, bad)) == 1
        assert len(apply_records(conn, bad)) == 0
        assert conn.execute("SELECT COUNT(*) FROM logs").fetchone()[0] == 121
    finally:
        db.close()


def test_apply_records_batches_logs_and_keeps_ids_events_and_other_kinds(tmp_path: Path) -> None:
    """Log records go in with one executemany per batch: every event must carry the id of its own
    row, a bad record among them costs only itself, ids repeated within a batch are stored once,
    and the other kinds in the same batch are applied too."""
    from bus import topics
    from greyproxy.store import open_database
    from services.recorder.apply import apply_records

    db = open_database(tmp_path / "t.db")
    try:
        conn = db.connection()
        pend = {
            "container_name": CONTAINER,
            "destination_host": "held.example",
            "destination_port": 443,
            "ts": time.time(),
            "waiting": 1,
        }
        batch = [(f"a-{i}", "log", _record(i)) for i in range(300)]
        batch.insert(100, ("p-1", "pending", pend))
        batch.insert(200, ("bad-2", "log", {"container_name": None, "result": "allowed"}))  # NOT NULL
        batch.insert(250, ("bad-3", "log", "not a dict"))
        batch += batch[10:20]  # a resend coalesced with the original
        events = apply_records(conn, batch)
        logs = [data for topic, data in events if topic == topics.LOG_NEW]
        assert len(logs) == 300
        assert [t for t, _d in events].count(topics.PENDING_CREATED) == 1
        rows = dict(conn.execute("SELECT id, reason FROM logs").fetchall())
        assert len(rows) == 300
        assert all(rows[e["id"]] == e["reason"] for e in logs)  # each event names its own row
        assert sorted(e["reason"] for e in logs) == sorted(f"r{i}" for i in range(300))
        assert conn.execute("SELECT COUNT(*) FROM pending").fetchone()[0] == 1
        assert conn.execute("SELECT SUM(hi - lo + 1) FROM journal_ranges").fetchone()[0] == 303
        # A row SQLite refuses midway through the executemany: the run is redone record by record.
        refused = [(f"c-{i}", "log", _record(2000 + i)) for i in range(50)]
        refused.insert(25, ("bad-4", "log", {"container_name": None, "result": "allowed"}))
        assert len(apply_records(conn, refused)) == 50
        assert conn.execute("SELECT COUNT(*) FROM logs").fetchone()[0] == 350
        # Ids keep counting from the sequence after a deletion of the newest rows.
        conn.execute("DELETE FROM logs WHERE id > 250")
        more = apply_records(conn, [(f"b-{i}", "log", _record(1000 + i)) for i in range(5)])
        rows = dict(conn.execute("SELECT id, reason FROM logs WHERE id > 250").fetchall())
        assert {e["id"]: e["reason"] for _t, e in more} == rows and min(rows) > 300
    finally:
        db.close()
