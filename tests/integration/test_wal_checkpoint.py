"""The -wal stays bounded under sustained writes: checkpointed by maintenance every
`database.checkpointInterval` while it runs (the recorder's COMMITs then never checkpoint), and by
the recorder itself past `database.walAutocheckpoint` pages once maintenance is stopped; every
record reads back, through the API too, and a reader polling the API meanwhile never sees a count
go backwards.

Real processes (`greyproxy run` bus, recorder, maintenance, api: maintenance can then be stopped
for good, which supervisord would not allow), the records pushed through the journal by the
proxy's JournalWriter at a steady pace.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
import zmq.asyncio

from bus import records
from bus.journal import JournalWriter
from bus.reqrep import ServiceUnavailable, call_sync
from conftest import Stack, wait_for
from greyproxy.config import load_config

pytestmark = pytest.mark.stack

INTERVAL = 0.5  # database.checkpointInterval (its default)
BOUND = 4000  # database.walAutocheckpoint, pages (its default)
PER_TICK, TICK = 400, 0.02  # 20 000 records/s: ~2 400 -wal pages/s (0.12 a log record), ~1 200 per interval
PHASE_RECORDS = 100_000  # per phase (5 s at that pace): ~12 000 pages, three times the bound
CONTAINER = "walc"
HEADER, FRAME = 32, 4096 + 24  # the -wal's header and one frame (page + its header) at 4 KiB pages


class WalWatcher(threading.Thread):
    """Samples the -wal's size every 2 ms: its high-water mark in pages (the file keeps its size when
    a checkpoint lets the next write start it over, so the size is how far it ever reached)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.stop, self.max_pages = path, threading.Event(), 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                size = os.path.getsize(self.path)
            except OSError:
                size = 0
            self.max_pages = max(self.max_pages, (max(size, HEADER) - HEADER) // FRAME)
            time.sleep(0.002)


class ApiReader(threading.Thread):
    """GET /api/logs for the test's container every 20 ms: the totals seen, in order."""

    def __init__(self, api: str) -> None:
        super().__init__(daemon=True)
        self.api, self.stop, self.totals, self.errors = api, threading.Event(), [], []

    def run(self) -> None:
        with httpx.Client(timeout=5, trust_env=False) as client:
            while not self.stop.is_set():
                try:
                    r = client.get(f"{self.api}/api/logs", params={"container": CONTAINER, "limit": 1})
                    if r.status_code == 200:
                        self.totals.append(r.json()["total"])
                    else:
                        self.errors.append(r.status_code)
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                time.sleep(0.02)


async def push(endpoint: str, start: int, count: int) -> int:
    """`count` log records, PER_TICK every TICK, then until all are committed; how many."""
    ctx = zmq.asyncio.Context()
    writer = JournalWriter(endpoint, ctx=ctx)
    task = asyncio.create_task(writer.run())
    n = start
    try:
        while n < start + count:
            for _ in range(PER_TICK):
                writer.append(
                    records.LOG,
                    records.log_values(
                        CONTAINER, f"h{n % 50}.example", 443, "CONNECT", records.ALLOWED, reason=f"r{n}"
                    ),
                )
                n += 1
            await asyncio.sleep(TICK)
        assert await writer.flush(60), writer.stats()
        assert writer.dropped == 0, writer.stats()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        ctx.destroy(linger=0)
    return n - start


def test_wal_stays_bounded_with_maintenance_running_and_stopped(short_tmp: Path, service_runner) -> None:
    stack = Stack({"database": {"checkpointInterval": INTERVAL, "walAutocheckpoint": BOUND}}, root=short_tmp)
    bus = load_config(stack.cfg_path, env=stack.env).bus
    procs = {
        name: service_runner(name, stack.cfg_path, stack.env, short_tmp / f"{name}.log")
        for name in ("bus", "recorder", "maintenance", "api")
    }
    logs = lambda: "\n".join(p.logs() for p in procs.values())  # noqa: E731

    def maintenance_stats() -> dict | None:
        try:
            return call_sync(bus["maintenanceControl"], "maintenance", "stats", timeout=1, retries=1)
        except ServiceUnavailable:
            return None

    def api_up() -> bool:
        try:
            return httpx.get(f"{stack.api}/api/logs", timeout=1, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(api_up, 30, message="the API to answer")
        wait_for(lambda: (maintenance_stats() or {}).get("checkpoints"), 30, message="maintenance's checkpoints")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{logs()}") from None
    wal = Path(f"{stack.db_path}-wal")
    reader = ApiReader(stack.api)
    reader.start()

    # 1. Maintenance running: it checkpoints every INTERVAL, the -wal starts over after each one and
    #    stays far below the recorder's bound (~1 200 pages an interval at this pace). A PASSIVE
    #    checkpoint alone would not do: the recorder commits during it, the -wal never starts over.
    watcher = WalWatcher(wal)
    watcher.start()
    n1 = asyncio.run(push(bus["journal"], 0, PHASE_RECORDS))
    watcher.stop.set()
    watcher.join()
    ckpt = (maintenance_stats() or {}).get("checkpoints")
    assert ckpt and ckpt["runs"] >= PHASE_RECORDS / (PER_TICK / TICK) / INTERVAL / 2, (ckpt, logs())
    print(f"\nmaintenance running: {n1} records, -wal at most {watcher.max_pages} pages, checkpoints {ckpt}")
    assert watcher.max_pages <= 0.6 * BOUND, f"-wal reached {watcher.max_pages} pages with maintenance running"

    # 2. Maintenance stopped: the recorder checkpoints itself past BOUND pages (in its COMMIT).
    assert procs["maintenance"].stop() == 0, logs()
    watcher = WalWatcher(wal)
    watcher.start()
    n2 = asyncio.run(push(bus["journal"], n1, PHASE_RECORDS))
    watcher.stop.set()
    watcher.join()
    written = n2 * 0.1  # pages the phase wrote at least (0.12 per record measured)
    print(f"maintenance stopped: {n2} records, -wal at most {watcher.max_pages} pages")
    assert written > 2 * BOUND, "the phase wrote too little to test the bound"
    assert BOUND * 0.8 <= watcher.max_pages <= BOUND + 600, (  # + a few batches a reader held it up
        f"-wal reached {watcher.max_pages} pages with maintenance stopped (bound {BOUND}, ~{written:.0f} written)"
    )

    # 3. Everything reads back: in the table, through the API, and never less than before meanwhile.
    n = n1 + n2
    wait_for(lambda: reader.totals and reader.totals[-1] == n, 10, message=f"the API to list {n} logs")
    reader.stop.set()
    reader.join()
    assert not reader.errors, reader.errors[:5]
    assert all(a <= b for a, b in zip(reader.totals, reader.totals[1:])), "a total went backwards"
    assert len(set(reader.totals)) > 10, reader.totals  # it read while the writes went on
    assert stack.db_rows(
        "SELECT COUNT(*), COUNT(DISTINCT reason) FROM logs WHERE container_name = ?", (CONTAINER,)
    ) == [(n, n)]
    r = httpx.get(f"{stack.api}/api/logs", params={"container": CONTAINER, "limit": 5}, trust_env=False)
    assert [row["reason"] for row in r.json()["items"]] == [f"r{i}" for i in range(n - 1, n - 6, -1)]
