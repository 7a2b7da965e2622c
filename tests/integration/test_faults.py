"""Fault tolerance of the real stack (issue 8).

- supervisord killed with -9: none of its programs outlives it;
- under a steady, bounded load through the HTTP proxy, the recorder, the API, maintenance and the
  bus broker are killed -9 in turn (supervisord restarts them): every allowed request succeeds,
  `/api/health` names what is down at once (never hangs), every process rejoins the restarted
  broker (heartbeats and events flow again), and once the recorder has drained the database
  holds one log entry per request;
- the proxy killed -9 under load: clients see connection errors only while it is down, and it
  serves again within 15 s.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from dataclasses import dataclass, field

import httpx
import orjson
import pytest
import zmq

from bus.reqrep import call_sync
from conftest import PYTHON, REPO, Stack, pid_alive, service_env, wait_for
from greyproxy.config import load_config

pytestmark = pytest.mark.stack

ORIGIN = "127.0.0.2"
CLIENTS = 60  # concurrent clients of the load
PAUSE = 0.2  # seconds each client waits between requests (keeps the load bounded)
REQUEST_TIMEOUT = 30  # generous: the machine may be busy
RESTART_TIMEOUT = 25  # supervisord restart + Python start on a loaded machine


# ----------------------------------------------------------------------------- 1. parent death


def test_children_exit_when_supervisord_is_killed(make_stack) -> None:
    s = make_stack()
    children = s.child_pids()
    assert len(children) >= 5, children
    everything = set(children)
    os.kill(s.proc.pid, signal.SIGKILL)
    s.proc.wait(10)
    t0 = time.monotonic()
    wait_for(
        lambda: not any(pid_alive(p) for p in everything),
        10,
        interval=0.1,
        message=f"every program of the killed supervisord to exit (left: {[p for p in everything if pid_alive(p)]})",
    )
    assert time.monotonic() - t0 < 10


_FALLBACK_CHILD = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
import greyproxy.runtime as rt
rt._set_pdeathsig = lambda sig: False  # as on a platform without prctl: only the getppid() watch
os.environ["GREYPROXY_EXIT_WITH_PARENT"] = "1"
assert rt.exit_with_parent()
print(os.getpid(), flush=True)
time.sleep(60)
"""

_FALLBACK_PARENT = r"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
print(child.stdout.readline().strip(), flush=True)
time.sleep(60)
"""


def test_parent_watch_without_pdeathsig() -> None:
    """The getppid() fallback alone also ends a process whose parent was killed -9."""
    parent = subprocess.Popen(
        [PYTHON, "-c", _FALLBACK_PARENT, _FALLBACK_CHILD, str(REPO)],
        stdout=subprocess.PIPE,
        text=True,
        env=service_env(),
        start_new_session=True,
    )
    child = None
    try:
        child = int(parent.stdout.readline().strip())
        assert pid_alive(child)
        parent.kill()
        parent.wait(10)
        wait_for(lambda: not pid_alive(child), 10, interval=0.1, message="the orphan to notice and exit")
    finally:
        parent.kill()
        if child and pid_alive(child):
            os.kill(child, signal.SIGKILL)


# ----------------------------------------------------------------------------- the load


@dataclass
class Result:
    start: float
    end: float
    ok: bool
    error: str = ""


@dataclass
class Load:
    """CLIENTS asyncio clients sending plain-HTTP GETs through the proxy, one connection each."""

    proxy_port: int
    origin_port: int
    container: str
    results: list[Result] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        auth = base64.b64encode(f"{self.container}:x".encode()).decode()
        self._request = (
            f"GET http://{ORIGIN}:{self.origin_port}/ok HTTP/1.1\r\nHost: {ORIGIN}:{self.origin_port}\r\n"
            f"Proxy-Authorization: Basic {auth}\r\nConnection: close\r\n\r\n"
        ).encode()

    def start(self) -> Load:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(REQUEST_TIMEOUT + 10)
        assert not self._thread.is_alive(), "the load did not stop"

    async def _main(self) -> None:
        await asyncio.gather(*(self._client(i) for i in range(CLIENTS)))

    async def _client(self, i: int) -> None:
        await asyncio.sleep(i * PAUSE / CLIENTS)  # spread the starts
        while not self._stop.is_set():
            t0 = time.monotonic()
            ok, err = await self._one()
            self.results.append(Result(t0, time.monotonic(), ok, err))
            await asyncio.sleep(PAUSE)

    async def _one(self) -> tuple[bool, str]:
        writer = None
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy_port)
                writer.write(self._request)
                data = await reader.read(-1)
        except (OSError, asyncio.IncompleteReadError) as exc:
            return False, f"connection: {type(exc).__name__}"
        except TimeoutError:
            return False, "timeout"
        finally:
            if writer is not None:
                writer.close()
        if not data:
            return False, "connection: closed without an answer"
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200") or body != b"ok":
            status = head.split(b"\r\n", 1)[0]
            return False, f"http: {status!r}"
        return True, ""

    def successes(self) -> int:
        return sum(1 for r in list(self.results) if r.ok)

    def failures(self) -> list[Result]:
        return [r for r in list(self.results) if not r.ok]


def _serve_origin() -> tuple[int, threading.Event]:
    """A tiny HTTP origin on ORIGIN answering every request with 200 "ok", in its own loop."""
    sock = socket.create_server((ORIGIN, 0))
    port = sock.getsockname()[1]
    stop = threading.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, sock=sock, backlog=512)
        async with server:
            while not stop.is_set():
                await asyncio.sleep(0.2)

    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
    return port, stop


class BusWatcher:
    """A plain SUB socket on the bus, collecting the topics asked for (in a thread)."""

    def __init__(self, endpoint: str, prefixes: tuple[str, ...]) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 200)
        self.sock.connect(endpoint)
        for p in prefixes:
            self.sock.setsockopt(zmq.SUBSCRIBE, p.encode())
        self.messages: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frames = self.sock.recv_multipart()
            except zmq.Again:
                continue
            self.messages.append(orjson.loads(frames[1]))

    def seen(self, topic: str, pred=lambda data: True) -> dict | None:
        for m in list(self.messages):
            if m["type"] == topic and pred(m["data"]):
                return m
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        self.ctx.term()


# ----------------------------------------------------------------------------- helpers


def _health(stack: Stack, timeout: float = 5.0) -> tuple[int, dict, float]:
    t0 = time.monotonic()
    r = httpx.get(stack.url("/api/health"), timeout=timeout, trust_env=False)
    return r.status_code, r.json(), time.monotonic() - t0


def _pid_of(stack: Stack, service: str) -> int:
    def up() -> int | None:
        code, body, _ = _health(stack)
        svc = body["services"][service]
        return svc["pid"] if svc["up"] else None

    pid = wait_for(up, RESTART_TIMEOUT, interval=0.1, message=f"{service} up")
    assert pid in stack.child_pids(), (service, pid, stack.child_pids())  # ours to kill, not a reused pid
    stack._known_pids.add(pid)
    return pid


def _restarted(stack: Stack, service: str, old: int) -> int:
    def new_pid() -> int | None:
        code, body, _ = _health(stack)
        svc = body["services"][service]
        return svc["pid"] if svc["up"] and svc["pid"] != old else None

    pid = wait_for(new_pid, RESTART_TIMEOUT, interval=0.1, message=f"{service} restarted")
    stack._known_pids.add(pid)
    return pid


def _load_moves_on(load: "Load") -> None:
    """Wait until every load client has completed more requests (a counter, not a fixed sleep):
    the stack serves traffic again after the step before."""
    start = load.successes()
    wait_for(lambda: load.successes() >= start + CLIENTS, 20, message="the load to make progress")


def _kill_and_see_it_named(stack: Stack, service: str) -> int:
    """kill -9 the service; /api/health must answer at once, 503, naming it."""
    old = _pid_of(stack, service)
    os.kill(old, signal.SIGKILL)
    code, body, took = _health(stack)
    assert took < 3, f"/api/health took {took:.1f}s with {service} dead"
    assert code == 503 and service in body.get("down", []), (service, code, body)
    assert body["status"] == "degraded" and service in body["error"]
    return old


def _log_rows(stack: Stack, container: str) -> int:
    con = sqlite3.connect(f"file:{stack.db_path}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute("SELECT COUNT(*) FROM logs WHERE container_name = ?", (container,)).fetchone()[0]
    finally:
        con.close()


def _pending_request(stack: Stack, container: str, host: str) -> None:
    """A plain-HTTP request to a destination no rule covers: held, then blocked (hold timeout)."""
    auth = base64.b64encode(f"{container}:x".encode()).decode()
    with socket.create_connection(("127.0.0.1", stack.ports["http-proxy"]), timeout=REQUEST_TIMEOUT) as s:
        s.sendall(
            f"GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\nProxy-Authorization: Basic {auth}\r\n"
            f"Connection: close\r\n\r\n".encode()
        )
        with contextlib.suppress(OSError):
            while s.recv(4096):
                pass


# ----------------------------------------------------------------------------- 2. the fault run


def test_services_killed_under_load_lose_nothing(make_stack) -> None:
    s = make_stack(timeout=40, proxy={"holdTimeout": 3})
    origin_port, origin_stop = _serve_origin()
    cfg = load_config(s.cfg_path, env=s.env)
    watcher: BusWatcher | None = None
    load = Load(s.ports["http-proxy"], origin_port, "fault-load")
    try:
        r = s.request(
            "POST",
            "/api/rules",
            json={
                "container_pattern": "fault-*",
                "destination_pattern": ORIGIN,
                "port_pattern": str(origin_port),
                "action": "allow",
            },
        )
        assert r.status_code == 201, r.text
        load.start()
        wait_for(lambda: load.successes() >= CLIENTS, 20, message="the load to get going")

        # -- recorder: the journal keeps the records; health names it at once.
        old = _kill_and_see_it_named(s, "recorder")
        _restarted(s, "recorder", old)
        _load_moves_on(load)

        # -- API: it comes back; nothing else notices.
        old = _pid_of(s, "api")
        os.kill(old, signal.SIGKILL)
        s.wait_healthy(RESTART_TIMEOUT)
        assert _pid_of(s, "api") != old
        _load_moves_on(load)

        # -- maintenance.
        old = _kill_and_see_it_named(s, "maintenance")
        _restarted(s, "maintenance", old)
        _load_moves_on(load)

        # -- the bus broker: every other process must rejoin the new one, none restarted.
        others = {name: _pid_of(s, name) for name in ("proxy", "recorder", "maintenance", "api")}
        old = _kill_and_see_it_named(s, "bus")
        _restarted(s, "bus", old)
        body = s.wait_healthy(RESTART_TIMEOUT)  # heartbeats of every process reach the API again
        assert {n: body["services"][n]["pid"] for n in others} == others, (others, body["services"])

        watcher = BusWatcher(cfg.bus["sub"], ("rule.created", "pending_request.", "waiters.changed"))
        time.sleep(0.5)  # zmq's slow joiner
        r = s.request(
            "POST",
            "/api/rules",
            json={
                "container_pattern": "after-restart",
                "action": "allow",
                "destination_pattern": ORIGIN,
                "port_pattern": str(origin_port),
            },
        )
        assert r.status_code == 201, r.text
        rule_id = r.json()["id"]
        wait_for(
            lambda: watcher.seen("rule.created", lambda d: d.get("id") == rule_id),
            10,
            message="rule.created from the API on the new broker",
        )
        # The new rule reached the proxy: its client is let through at once, not held (then 403).
        with httpx.Client(
            proxy=f"http://after-restart:x@127.0.0.1:{s.ports['http-proxy']}", trust_env=False, timeout=REQUEST_TIMEOUT
        ) as client:
            r = client.get(f"http://{ORIGIN}:{origin_port}/after-restart")
            assert r.status_code == 200 and r.text == "ok", r.text
        held = threading.Thread(target=_pending_request, args=(s, "fault-pending", "pending-after-restart.test"))
        held.start()
        wait_for(
            lambda: watcher.seen("waiters.changed", lambda d: d.get("container_name") == "fault-pending"),
            15,
            message="waiters.changed from the proxy on the new broker",
        )
        wait_for(
            lambda: watcher.seen("pending_request.created", lambda d: d.get("container_name") == "fault-pending"),
            15,
            message="pending_request.created from the recorder on the new broker",
        )
        held.join(REQUEST_TIMEOUT)
        _load_moves_on(load)
    finally:
        load.stop()

    # Every allowed request succeeded ...
    failures = load.failures()
    done = load.successes()
    assert not failures, f"{len(failures)} of {len(load.results)} requests failed, e.g. {failures[:5]}"
    assert done >= 5 * CLIENTS, done
    # ... and once the recorder has drained, each has its log entry, once.
    wait_for(
        lambda: _log_rows(s, "fault-load") >= done,
        60,
        interval=0.2,
        message=f"{done} log entries for fault-load (have {_log_rows(s, 'fault-load')})",
    )

    def journal() -> dict:
        return call_sync(cfg.bus["proxyControl"], "proxy", "stats", timeout=2, retries=3)["journal"]

    # The outbox drains (a record appended just now, such as the rule hits' periodic flush, waits
    # its batch's 20 ms: not a loss), and nothing was ever dropped.
    stats = wait_for(
        lambda: (j := journal())["queued"] == 0 and j["inflight"] == 0 and j, 10, message="the journal's outbox drained"
    )
    assert stats["dropped"] == 0, stats
    assert _log_rows(s, "fault-load") == done
    print(f"\n{done} requests, {len(load.results)} total; journal {stats}")

    # -- the proxy itself: connection errors only while it is down, back within 15 s.
    load = Load(s.ports["http-proxy"], origin_port, "fault-proxy")
    try:
        load.start()
        wait_for(lambda: load.successes() >= CLIENTS, 20, message="the second load to get going")
        old = _pid_of(s, "proxy")
        killed_at = time.monotonic()
        os.kill(old, signal.SIGKILL)
        code, body, took = _health(s)
        assert took < 3 and code == 503 and "proxy" in body.get("down", []), (code, body, took)

        def served_again() -> float | None:
            after = [r.end for r in list(load.results) if r.ok and r.start > killed_at]
            return min(after) if after else None

        back_at = wait_for(served_again, 20, interval=0.1, message="the proxy serving again")
        assert back_at - killed_at < 15, f"the proxy took {back_at - killed_at:.1f}s to serve again"
        wait_for(
            lambda: sum(1 for r in list(load.results) if r.ok and r.start > back_at) >= 2 * CLIENTS,
            20,
            message="the load to go on after the restart",
        )
    finally:
        load.stop()
        origin_stop.set()
        if watcher is not None:
            watcher.close()
    failures = load.failures()
    assert failures, "killing the proxy broke no request at all?"
    for f in failures:
        assert f.error.startswith("connection:"), f  # refused/reset, never an HTTP error or a hang
        assert f.end >= killed_at and f.start <= back_at + 0.5, (f, killed_at, back_at)
    print(f"proxy down for {back_at - killed_at:.1f}s; {len(failures)} requests failed during it")
