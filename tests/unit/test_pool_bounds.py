"""UpstreamPool bounds and choices (services/proxy/pool.py); the behaviour through the real stack is
in tests/integration/test_upstream_pool.py."""

from __future__ import annotations

import asyncio

from greyproxy.policy import Rule, RuleSet
from services.proxy.conn import Conn
from services.proxy.gate import Admission, Gate, Verdict
from services.proxy.pool import UpstreamPool
from harness.fakes import Journal, Publisher


class FakeTransport(asyncio.Transport):
    def __init__(self, peer: str = "192.0.2.1") -> None:
        super().__init__({"peername": (peer, 80)})
        self.closing = False
        self.aborted = False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True


def conn(peer: str = "192.0.2.1") -> Conn:
    c = Conn()
    c.connection_made(FakeTransport(peer))
    return c


def closed(c: Conn) -> bool:
    return c.transport.is_closing()  # type: ignore[union-attr]


A = ("alice", "example.com", 80)
B = ("bob", "example.com", 80)
GATE = Gate(Journal(), Publisher(), {1}, set(), 0.05, 10)  # type: ignore[arg-type]  # no address rule


def admission(key: tuple[str, str, int], gate: Gate = GATE) -> Admission:
    """A new request's admission for `key` (what the pool judges a parked connection for)."""
    return Admission(gate, key[0], key[1], key[2], "HTTP", Verdict(True, "rule", 1))


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.new_event_loop().run_until_complete(coro)


def test_get_gives_back_the_most_recent_connection_of_that_key_only() -> None:
    async def go() -> None:
        pool = UpstreamPool(per_key=4, total=16, idle_timeout=30)
        c1, c2 = conn(), conn()
        pool.put(A, c1)
        pool.put(A, c2)
        assert pool.get(B, admission(B)) is None  # another identity never gets alice's connections
        assert pool.get(A, admission(A)) is c2
        assert pool.get(A, admission(A)) is c1
        assert pool.get(A, admission(A)) is None
        assert len(pool) == 0 and pool.stats()["reused"] == 2
        pool.close_all()

    run(go())


def test_per_key_and_total_bounds_close_the_oldest() -> None:
    async def go() -> None:
        pool = UpstreamPool(per_key=2, total=3, idle_timeout=30)
        a = [conn() for _ in range(3)]
        for c in a:
            pool.put(A, c)
        assert closed(a[0]) and not closed(a[1]) and len(pool) == 2
        b = [conn() for _ in range(2)]
        for c in b:
            pool.put(B, c)
        assert len(pool) == 3 and closed(a[1])  # the oldest overall went
        assert pool.get(A, admission(A)) is a[2]
        pool.close_all()
        assert all(closed(c) for c in (a[0], a[1], *b)) and not closed(a[2])  # a[2] is in use

    run(go())


def test_unusable_connections_are_never_handed_out() -> None:
    async def go() -> None:
        pool = UpstreamPool(per_key=8, total=16, idle_timeout=30)
        eof, chatty, gone, good = conn(), conn(), conn(), conn()
        pool.put(A, good)
        for c in (eof, chatty, gone):
            pool.put(A, c)
        eof.eof_received()  # the origin closed its side while parked
        chatty.data_received(b"HTTP/1.1 408 Request Timeout\r\n\r\n")  # unsolicited bytes
        gone.connection_lost(None)
        assert pool.get(A, admission(A)) is good
        assert closed(eof) and closed(chatty)
        # A connection that is already unusable is not parked at all.
        done = conn()
        done.eof_received()
        pool.put(A, done)
        assert len(pool) == 0 and closed(done)

    run(go())


def test_disabled_pool_closes_at_once() -> None:
    async def go() -> None:
        pool = UpstreamPool(per_key=0, total=0, idle_timeout=30)
        c = conn()
        pool.put(A, c)
        assert closed(c) and pool.get(A, admission(A)) is None

    run(go())


def test_idle_connections_are_swept() -> None:
    async def go() -> None:
        pool = UpstreamPool(per_key=4, total=16, idle_timeout=1.0)
        c = conn()
        pool.put(A, c)
        await asyncio.sleep(0.2)
        assert not closed(c)  # well inside the idle time (a busy machine may be late by a lot)
        for _ in range(100):  # then swept: waited for, not slept for a fixed time
            if closed(c):
                break
            await asyncio.sleep(0.05)
        assert closed(c) and len(pool) == 0

    run(go())


def test_put_takes_the_connections_loop_not_get_running_loop(monkeypatch) -> None:  # noqa: ANN001
    """Parking costs no asyncio.get_running_loop() (a getpid() system call in CPython 3.11): the
    loop is the connection's own; the sweeper still runs on it."""
    from services.proxy import pool as pool_mod

    async def go() -> None:
        pool = UpstreamPool(per_key=4, total=16, idle_timeout=0.2)
        c = conn()
        c._bind_loop()  # as a connection that has read (every upstream that served an exchange)

        def no(*_a: object) -> None:
            raise AssertionError("get_running_loop() on the parking path")

        with monkeypatch.context() as m:
            m.setattr(pool_mod.asyncio, "get_running_loop", no)
            pool.put(A, c)
        assert len(pool) == 1
        await asyncio.sleep(0.4)  # the sweeper closes it after idle_timeout
        assert len(pool) == 0 and closed(c)

    run(go())


def test_a_parked_connection_is_judged_again_for_the_new_requests_admission() -> None:
    """An address rule added while a connection was parked: the next request of that client does
    not get it (closed; its fresh connect is judged and logged as any); other clients' rules and
    other addresses do not matter. No log entry for the refused parked connection."""

    async def go() -> None:
        gate = Gate(Journal(), Publisher(), {1}, set(), 0.05, 10)  # type: ignore[arg-type]
        pool = UpstreamPool(per_key=4, total=16, idle_timeout=30)
        denied, other = conn("192.0.2.1"), conn("198.51.100.1")
        pool.put(A, other)
        pool.put(A, denied)  # most recent: tried first
        gate.set_rules(RuleSet([Rule(1, "alice", "192.0.2.0/24", "*", "deny"), Rule(2, "*", "*", "*", "allow")]), 2)
        assert pool.get(A, admission(A, gate)) is other
        assert closed(denied) and len(pool) == 0
        assert not gate.journal.records  # type: ignore[attr-defined]
        # another client's address rule does not refuse alice's connections
        mine = conn("192.0.2.1")
        pool.put(B, mine)
        assert pool.get(B, admission(B, gate)) is mine
        pool.close_all()

    run(go())
