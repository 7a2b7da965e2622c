"""Request/reply control: a dead peer is a quick ServiceUnavailable, never a hang; errors keep
their status; a restarted server is reached again by the same client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq.asyncio

from bus.reqrep import ControlClient, ControlServer, RemoteError, ServiceUnavailable, call_sync
from conftest import free_port, service_env, wait_for, write_config

pytestmark = pytest.mark.stack


def _endpoints(root: Path) -> list[str]:
    return [f"ipc://{root}/nobody.sock", f"tcp://127.0.0.1:{free_port()}"]


class ServerHarness:
    """A ControlServer serving as a task; stop() closes it, start() binds it again."""

    def __init__(self, endpoint: str, handlers: dict, ctx: zmq.asyncio.Context) -> None:
        self.endpoint, self.handlers, self.ctx = endpoint, handlers, ctx
        self.server: ControlServer | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.server = ControlServer(self.endpoint, self.handlers, ctx=self.ctx)
        self.task = asyncio.create_task(self.server.serve())

    async def stop(self) -> None:
        assert self.task is not None and self.server is not None
        self.task.cancel()
        done, _ = await asyncio.wait({self.task}, timeout=5)
        assert done, "ControlServer.serve() ignored its cancellation"
        self.server.close()


def test_client_to_nobody_fails_fast(short_tmp: Path) -> None:
    endpoints = _endpoints(short_tmp)  # an ipc path and a tcp port where nobody listens

    async def one(ctx: zmq.asyncio.Context, endpoint: str) -> float:
        client = ControlClient(endpoint, "ghost", ctx=ctx)  # the defaults: 3 tries of 0.8 s
        t0 = time.monotonic()
        try:
            with pytest.raises(ServiceUnavailable) as info:
                await client.call("ping")
            assert info.value.service == "ghost"
            assert "ghost" in str(info.value)
            return time.monotonic() - t0
        finally:
            client.close()

    async def go() -> list[float]:
        ctx = zmq.asyncio.Context()
        try:
            return await asyncio.gather(*(one(ctx, ep) for ep in endpoints))
        finally:
            ctx.destroy(linger=0)

    for endpoint, elapsed in zip(endpoints, asyncio.run(go())):
        assert elapsed < 3.0, (endpoint, elapsed)

    t0 = time.monotonic()
    with pytest.raises(ServiceUnavailable):
        call_sync(endpoints[0], "ghost", "ping")
    assert time.monotonic() - t0 < 3.0


@contextlib.contextmanager
def caplog_at(name: str) -> Iterator[list[logging.LogRecord]]:
    """The records logger `name` emits inside the block."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_live_server_ops_errors_and_restart(short_tmp: Path) -> None:
    endpoint = f"ipc://{short_tmp}/ctl.sock"

    async def add(args: dict) -> dict:
        await asyncio.sleep(0)
        return {"sum": args["a"] + args["b"]}

    def conflict(args: dict) -> None:
        raise RemoteError("already running", 409)

    def broken(args: dict) -> None:
        raise ZeroDivisionError("boom")

    def dependency_away(args: dict) -> None:  # a proxy on another host whose recorder does not answer
        raise ServiceUnavailable("recorder", "no answer after 3 tries of 2.0s")

    handlers = {"add": add, "conflict": conflict, "broken": broken, "away": dependency_away}

    async def go() -> None:
        ctx = zmq.asyncio.Context()
        harness = ServerHarness(endpoint, handlers, ctx)
        client = ControlClient(endpoint, "svc", timeout=0.5, retries=2, ctx=ctx)
        try:
            harness.start()
            pong = await client.call("ping")
            assert pong["pong"] is True and isinstance(pong["pid"], int)
            assert await client.call("add", {"a": 2, "b": 3}) == {"sum": 5}

            with pytest.raises(RemoteError) as info:
                await client.call("conflict")
            assert info.value.status == 409 and "already running" in str(info.value)
            with pytest.raises(RemoteError) as info:
                await client.call("no-such-op")
            assert info.value.status == 400
            with pytest.raises(RemoteError) as info:
                await client.call("broken")
            assert info.value.status == 500 and "boom" in str(info.value)
            # A process the handler asks did not answer: 503 saying so, a warning without a traceback
            with pytest.raises(RemoteError) as info, caplog_at("greyproxy.bus") as records:
                await client.call("away")
            assert info.value.status == 503
            assert str(info.value).endswith("recorder is not answering: no answer after 3 tries of 2.0s")
            assert [(r.levelname, r.exc_info) for r in records] == [("WARNING", None)]
            # The control loop survived its handlers' errors.
            assert await client.call("add", {"a": 1, "b": 1}) == {"sum": 2}

            # Several calls at once on one client are serialised, each gets its own answer.
            results = await asyncio.gather(*(client.call("add", {"a": i, "b": 0}) for i in range(10)))
            assert [r["sum"] for r in results] == list(range(10))

            await harness.stop()
            t0 = time.monotonic()
            with pytest.raises(ServiceUnavailable):
                await client.call("ping")
            assert time.monotonic() - t0 < 2.0

            harness.start()  # same endpoint, new socket
            assert await client.call("add", {"a": 20, "b": 22}) == {"sum": 42}
            await harness.stop()
            harness.start()  # and again without a failed call in between
            assert (await client.call("ping"))["pong"] is True
            await harness.stop()
        finally:
            client.close()
            ctx.destroy(linger=0)

    asyncio.run(go())


def test_call_sync_reaches_a_server_in_another_thread(short_tmp: Path) -> None:
    import threading

    endpoint = f"ipc://{short_tmp}/ctl.sock"
    ready = threading.Event()
    stop = threading.Event()

    def serve() -> None:
        async def main() -> None:
            ctx = zmq.asyncio.Context()
            server = ControlServer(endpoint, {"echo": lambda args: args}, ctx=ctx)
            task = asyncio.create_task(server.serve())
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.02)
            task.cancel()
            await asyncio.wait({task}, timeout=5)
            server.close()
            ctx.destroy(linger=0)

        asyncio.run(main())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        assert ready.wait(5)
        assert call_sync(endpoint, "svc", "echo", {"x": [1, "y"]}) == {"x": [1, "y"]}
        with pytest.raises(RemoteError) as info:
            call_sync(endpoint, "svc", "nope")
        assert info.value.status == 400
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive()


# ----------------------------------------------------------------------------- a real service


def test_maintenance_jobs_over_control(short_tmp: Path, service_runner) -> None:
    """`greyproxy run maintenance` alone: prune runs to the end, and a second start while it runs
    is refused with 409."""
    from greyproxy.store import open_database

    data = short_tmp / "data"
    cfg = short_tmp / "cfg.yaml"
    endpoints = {
        k: f"ipc://{short_tmp}/{k}.sock"
        for k in ("pub", "sub", "journal", "proxyControl", "recorderControl", "maintenanceControl")
    }
    write_config(cfg, {"bus": endpoints})
    ctl = endpoints["maintenanceControl"]

    # Old rows to prune: enough that the job takes a while (it deletes in small batches).
    db = open_database(data / "greyproxy.db")
    old = time.time() - 400 * 86400
    rows = [(old, "c", "h", 1, "HTTP", "allowed") for _ in range(40_000)]
    db.connection().executemany(
        "INSERT INTO logs (timestamp, container_name, destination_host, destination_port, method, result)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        rows,
    )
    db.connection().execute("INSERT INTO journal_applied (record_id, applied_at) VALUES ('old', ?)", (old,))
    db.close()

    svc = service_runner("maintenance", cfg, service_env(data), short_tmp / "maintenance.log")

    def ping():
        assert svc.alive(), svc.logs()
        try:
            return call_sync(ctl, "maintenance", "ping", timeout=0.3, retries=1)
        except ServiceUnavailable:
            return None

    wait_for(ping, 15, message="maintenance answering ping")

    started = call_sync(ctl, "maintenance", "job.start", {"job": "prune"})
    assert started == {"status": "started", "job": "prune"}
    with pytest.raises(RemoteError) as info:
        call_sync(ctl, "maintenance", "job.start", {"job": "prune"})
    assert info.value.status == 409, svc.logs()
    with pytest.raises(RemoteError) as info:
        call_sync(ctl, "maintenance", "job.start", {"job": "no-such-job"})
    assert info.value.status == 400

    def finished():
        st = call_sync(ctl, "maintenance", "job.status")["jobs"]["prune"]
        return (not st["running"] and st["finished_at"]) and st

    st = wait_for(finished, 30, interval=0.1, message="prune to finish")
    assert st["error"] is None, f"{st}\n{svc.logs()}"
    assert st["processed"] == st["total"] > 0
    assert st["started_at"].endswith("Z") and st["finished_at"].endswith("Z")

    con = sqlite3.connect(data / "greyproxy.db")
    try:
        assert con.execute("SELECT COUNT(*) FROM logs").fetchone()[0] == 0
        assert con.execute("SELECT COUNT(*) FROM journal_applied").fetchone()[0] == 0
        assert con.execute("SELECT COUNT(*) FROM rules WHERE source = 'builtin'").fetchone()[0] == 3
    finally:
        con.close()
    # Once finished, it can be started again.
    assert call_sync(ctl, "maintenance", "job.start", {"job": "prune"})["status"] == "started"
