"""Publishers know which topics someone subscribes to (through the real broker), and the recorder
builds and publishes per-request events only while someone wants them.

A real `greyproxy run bus` (and `run recorder`) on ipc endpoints; in-test SUB sockets, a
`bus.pubsub.Publisher` and a JournalWriter.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq
import zmq.asyncio

from bus import topics
from bus.journal import JournalWriter
from bus.pubsub import Publisher
from bus.reqrep import ServiceUnavailable, call_sync
from conftest import ServiceProcess, service_env, wait_for, write_config

pytestmark = pytest.mark.stack

ENDPOINTS = ("pub", "sub", "journal", "proxyControl", "recorderControl", "maintenanceControl")
UNSUB_WAIT = 5.0  # bound on how long an unsubscription may take to reach a publisher
CONTAINER = "interest-test"


class Bus:
    """Config with ipc bus endpoints in a short tmp dir; starts the broker (and the recorder)."""

    def __init__(self, root: Path, runner: Callable[..., ServiceProcess]) -> None:
        self.root = root
        self.runner = runner
        self.cfg_path = root / "cfg.yaml"
        self.ep = {k: f"ipc://{root}/{k}.sock" for k in ENDPOINTS}
        write_config(self.cfg_path, {"bus": self.ep})
        self.env = service_env(root / "data")
        self.db_path = root / "data" / "greyproxy.db"
        self.ctx = zmq.Context()
        self.socks: list[zmq.Socket] = []

    def start(self, name: str = "bus") -> ServiceProcess:
        proc = self.runner(name, self.cfg_path, self.env, self.root / f"{name}.log")
        if name == "bus":
            # The broker is up once its own heartbeat comes through.
            probe = self.sub(topics.SERVICE_HEARTBEAT)
            try:
                wait_for(lambda: probe.poll(100) or not proc.alive(), 15, message="broker heartbeat")
                assert proc.alive(), proc.logs()
            finally:
                self.close(probe)
        return proc

    def sub(self, *prefixes: str) -> zmq.Socket:
        s = self.ctx.socket(zmq.SUB)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.ep["sub"])
        for p in prefixes:
            s.setsockopt(zmq.SUBSCRIBE, p.encode())
        self.socks.append(s)
        return s

    def close(self, s: zmq.Socket) -> None:
        s.close(linger=0)
        self.socks.remove(s)

    def publisher(self, settle: float = 0.0) -> Publisher:
        pub = Publisher(self.ep["pub"], "interest-test", ctx=self.ctx, settle=settle)
        self.socks.append(pub._sock)
        return pub

    def shutdown(self) -> None:
        for s in self.socks:
            s.close(linger=0)
        self.ctx.term()


@pytest.fixture
def bus(short_tmp: Path, service_runner) -> Iterator[Bus]:
    b = Bus(short_tmp, service_runner)
    try:
        yield b
    finally:
        b.shutdown()


def recv_all(s: zmq.Socket, wait: float = 0.3) -> list[dict[str, Any]]:
    out = []
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        if s.poll(int(left * 1000) + 1):
            _topic, payload = s.recv_multipart()
            out.append(orjson.loads(payload))
    return out


def becomes(pub: Publisher, topic: str, value: bool, timeout: float = UNSUB_WAIT) -> None:
    wait_for(lambda: pub.wanted(topic) is value, timeout, interval=0.02, message=f"wanted({topic!r}) to become {value}")


def publish_until_received(pub: Publisher, sub: zmq.Socket, topic: str, timeout: float = 10.0) -> int:
    """Publish numbered events on `topic` until `sub` receives one; the number received."""
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        n += 1
        pub.publish(topic, {"n": n})
        if sub.poll(50):
            return orjson.loads(sub.recv_multipart()[1])["data"]["n"]
    raise AssertionError(f"no {topic} event received in {timeout}s")


# ----------------------------------------------------------------------------- the Publisher


def test_publisher_follows_subscriptions(bus: Bus) -> None:
    bus.start()
    pub = bus.publisher()
    assert not pub.wanted(topics.LOG_NEW)  # nobody subscribes (the broker's own heartbeat is no subscriber)

    s1 = bus.sub(topics.LOG_NEW)
    becomes(pub, topics.LOG_NEW, True)
    assert pub.wanted("log.newer")  # a prefix subscription, as in zmq
    assert not pub.wanted(topics.TRANSACTION_NEW) and not pub.wanted("log.")
    pub.publish(topics.TRANSACTION_NEW, {"x": 1})  # not wanted: counted, not sent
    assert pub.skipped == 1
    pub.publish(topics.LOG_NEW, {"x": 2})
    got = recv_all(s1)
    assert [(m["type"], m["data"], m["seq"]) for m in got] == [(topics.LOG_NEW, {"x": 2}, 2)]

    # A second subscriber to the same topic (and a wider prefix): the first one going away
    # leaves log.new wanted; the last one going away, nothing.
    s2 = bus.sub(topics.LOG_NEW, "log.")
    becomes(pub, "log.other", True)
    bus.close(s1)
    time.sleep(0.3)
    assert pub.wanted(topics.LOG_NEW)
    s2.setsockopt(zmq.UNSUBSCRIBE, b"log.")
    becomes(pub, "log.other", False)
    assert pub.wanted(topics.LOG_NEW)
    bus.close(s2)
    becomes(pub, topics.LOG_NEW, False)

    # A subscriber to everything makes everything wanted, until it unsubscribes.
    s3 = bus.sub("")
    becomes(pub, "anything.at.all", True)
    assert pub.wanted(topics.TRANSACTION_NEW) and pub.wanted(topics.LOG_NEW)
    s3.setsockopt(zmq.UNSUBSCRIBE, b"")
    becomes(pub, "anything.at.all", False)
    assert not pub.wanted(topics.LOG_NEW)


def test_a_publisher_connecting_later_learns_current_subscriptions(bus: Bus) -> None:
    bus.start()
    s = bus.sub(topics.TRANSACTION_NEW)
    first = bus.publisher()
    becomes(first, topics.TRANSACTION_NEW, True)  # the subscription is at the broker now
    late = bus.publisher()
    becomes(late, topics.TRANSACTION_NEW, True, timeout=2.0)
    assert not late.wanted(topics.LOG_NEW)
    late.publish(topics.TRANSACTION_NEW, {"late": True})
    assert [m["data"] for m in recv_all(s)] == [{"late": True}]


def test_in_doubt_everything_is_wanted(bus: Bus) -> None:
    """Before the publisher has heard from the broker (no broker yet here), it publishes."""
    pub = bus.publisher(settle=30.0)
    assert pub.wanted(topics.LOG_NEW) and pub.wanted("x")
    bus.start()
    s = bus.sub("x")
    becomes(pub, "x", True)
    assert not pub.wanted(topics.LOG_NEW)  # the first subscription settles the doubt
    bus.close(s)
    becomes(pub, "x", False)


def test_events_still_delivered_across_a_broker_restart(bus: Bus) -> None:
    broker = bus.start()
    s = bus.sub(topics.LOG_NEW)
    pub = bus.publisher()
    becomes(pub, topics.LOG_NEW, True)
    publish_until_received(pub, s, topics.LOG_NEW)

    broker.stop()
    # A subscriber's subscription outlives a broker restart (it resubscribes): the publisher
    # must never stop wanting its topic meanwhile.
    assert pub.wanted(topics.LOG_NEW)
    broker = bus.start()
    publish_until_received(pub, s, topics.LOG_NEW)
    assert pub.wanted(topics.LOG_NEW)
    pub.publish(topics.LOG_NEW, {"after": "restart"})
    assert {"after": "restart"} in [m["data"] for m in recv_all(s)]

    # Subscriptions made with the new broker are followed as before.
    s2 = bus.sub(topics.TRANSACTION_NEW)
    becomes(pub, topics.TRANSACTION_NEW, True)
    bus.close(s2)
    becomes(pub, topics.TRANSACTION_NEW, False)
    bus.close(s)
    becomes(pub, topics.LOG_NEW, False)


# ----------------------------------------------------------------------------- the recorder


def _log(marker: str, i: int) -> dict[str, Any]:
    return {
        "reason": f"{marker}-{i}",
        "container_name": CONTAINER,
        "destination_host": "h.example",
        "destination_port": 80,
        "method": "GET",
        "result": "allowed",
        "timestamp": 1000.0 + i,
    }


def _journal(endpoint: str, records: list[tuple[str, Any]]) -> None:
    async def go() -> None:
        ctx = zmq.asyncio.Context()
        writer = JournalWriter(endpoint, ack_timeout=1.0, ctx=ctx)
        task = asyncio.create_task(writer.run())
        try:
            for kind, data in records:
                writer.append(kind, data)
            assert await writer.flush(20), writer.stats()
        finally:
            task.cancel()
            await asyncio.wait({task}, timeout=5)
            ctx.destroy(linger=0)

    asyncio.run(go())


def _skipped(bus: Bus) -> int:
    return int(call_sync(bus.ep["recorderControl"], "recorder", "stats", timeout=2.0)["events_skipped"])


def test_recorder_publishes_per_request_events_only_while_wanted(bus: Bus) -> None:
    bus.start()
    bus.sub(topics.SERVICE_HEARTBEAT)  # as the API's health does: heartbeats are not skipped
    rec = bus.start("recorder")

    def ping() -> Any:
        assert rec.alive(), rec.logs()
        try:
            return call_sync(bus.ep["recorderControl"], "recorder", "ping", timeout=0.3, retries=1)
        except ServiceUnavailable:
            return None

    wait_for(ping, 15, message="recorder answering ping")
    time.sleep(Publisher.SETTLE)  # past the recorder publisher's "in doubt" time

    # Someone watches log.new: every record's event arrives, with its own row's id.
    watcher = bus.sub(topics.LOG_NEW)
    deadline = time.monotonic() + 10
    n = 0
    while not watcher.poll(100):  # until the subscription has reached the recorder
        assert time.monotonic() < deadline, "no log.new from the recorder"
        n += 1
        _journal(bus.ep["journal"], [("log", _log("warmup", n))])
    recv_all(watcher, 0.2)
    _journal(bus.ep["journal"], [("log", _log("seen", i)) for i in range(40)])
    events = [m for m in recv_all(watcher, 1.0) if m["data"]["reason"].startswith("seen-")]
    assert len(events) == 40
    con = sqlite3.connect(bus.db_path, timeout=10)
    try:
        rows = dict(con.execute("SELECT id, reason FROM logs WHERE reason LIKE 'seen-%'").fetchall())
    finally:
        con.close()
    assert {m["data"]["id"]: m["data"]["reason"] for m in events} == rows
    assert all(m["type"] == topics.LOG_NEW and m["source"] == "recorder" for m in events)

    # Nobody watches log.new any more: within a bounded time the recorder stops building them...
    pending_watcher = bus.sub("pending_request.")
    bus.close(watcher)
    deadline = time.monotonic() + UNSUB_WAIT
    while True:
        before = _skipped(bus)
        _journal(bus.ep["journal"], [("log", _log("probe", 0))])
        if _skipped(bus) > before:
            break
        assert time.monotonic() < deadline, "the recorder kept publishing log.new with no subscriber"
    # ...every record is still stored, and other kinds' events are still published.
    before = _skipped(bus)
    pend = {
        "container_name": CONTAINER,
        "destination_host": "held.example",
        "destination_port": 443,
        "ts": time.time(),
        "waiting": 1,
    }
    _journal(bus.ep["journal"], [("log", _log("unseen", i)) for i in range(30)] + [("pending", pend)])
    assert _skipped(bus) == before + 30
    got = recv_all(pending_watcher, 1.0)
    assert [(m["type"], m["data"]["destination_host"]) for m in got] == [(topics.PENDING_CREATED, "held.example")]
    con = sqlite3.connect(bus.db_path, timeout=10)
    try:
        assert con.execute("SELECT COUNT(*) FROM logs WHERE reason LIKE 'unseen-%'").fetchone()[0] == 30
    finally:
        con.close()


# ----------------------------------------------------------------------------- the broker's last word


def test_the_broker_says_it_is_stopping_on_a_clean_stop(bus: Bus) -> None:
    """SPEC §5 (health) and docs/events.md (heartbeat): like every service, the broker's last heartbeat on SIGTERM says
    `stopping` (and not ready), so /api/health shows the bus down at once and does not count its
    next start as a restart after a death."""
    proc = bus.start()
    hb = bus.sub(topics.SERVICE_HEARTBEAT)
    wait_for(lambda: hb.poll(100), 10, message="a broker heartbeat")
    first = orjson.loads(hb.recv_multipart()[1])["data"]
    assert first["service"] == "bus" and "stopping" not in first
    assert proc.stop() == 0
    last = recv_all(hb, wait=1.0)
    assert last, proc.logs()
    data = last[-1]["data"]
    assert data["service"] == "bus" and data["stopping"] is True and data["ready"] is False, last
    assert data["started_at"] == first["started_at"] and data["pid"] == first["pid"]
