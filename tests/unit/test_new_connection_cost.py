"""The shortcuts that make a new plain-HTTP connection cheaper (issue 18, `bench/tunnel_instr.py
--load newconn`) answer as the long ways they replace, without sockets:

- a parsed head renders upstream in one pass (`RequestHead.render_upstream`: Host, Connection and
  Proxy-* dropped there) exactly as the checked render of `upstream_headers()`;
- a response head's framing and hop-by-hop fields are told from its text in any letter case
  (`http1._response_field`, `_at`), without lowering the whole head (`ResponseHead.lower`: made when
  `header` first asks);
- `render_response_head(resp, keep, body)` is the head then the body;
- the upstream pool takes by the gate (`UpstreamPool.take`) and keeps an emptied queue for its
  key's next `put` (bounds and sweeping skip and drop the empty ones);
- the request cycles' deadlines (`keepalive.Deadlines`, time.monotonic) keep one timer per
  timeout, also when a cycle waits again from its own deadline, and never fire a cycle early;
- `close_both` aborts both connections of a tracked request.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from greyproxy.policy import Rule, RuleSet
from services.proxy import http1, keepalive
from services.proxy.conn import Conn
from services.proxy.context import ClientConn, Limits, ProxyContext
from services.proxy.gate import Gate
from services.proxy.pool import UpstreamPool
from harness.fakes import Journal, Publisher
from harness.fuzz import examples

FUZZ = settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- the upstream head in one pass

_REQUEST_NAMES = st.sampled_from(
    ["Host", "host", "HOST", "Connection", "connection", "CONNECTION", "Proxy-Connection", "proxy-x",
     "PROXY-Y", "Proxy", "Proxyx", "X-A", "x-b", "Accept", "Keep-Alive", "TE", "Upgrade", "Content-Length",
     "Authorization", "P"]
)  # fmt: skip
_CONNECTION_VALUES = st.sampled_from(
    ["close", "keep-alive", "Close", "KEEP-ALIVE", "x-a", "X-B, close", "host", "content-length", "proxy-x",
     "accept", "", " close ", "close,keep-alive", "upgrade"]
)  # fmt: skip


def _value(name: str, conn: str) -> str:
    if name.lower() == "content-length":
        return "0"
    if name.lower() == "connection":
        return conn
    return "v"


@FUZZ
@given(
    st.lists(st.tuples(_REQUEST_NAMES, _CONNECTION_VALUES), max_size=6),
    st.sampled_from(["1.0", "1.1"]),
    st.sampled_from(["GET http://e.com/p HTTP/1.1", "GET http://e.com:8080/ HTTP/1.0", "POST http://e.com HTTP/1.1"]),
)
@example([("Connection", "close")], "1.1", "GET http://e.com/p HTTP/1.1")
@example([("Connection", "x-a"), ("X-A", "1"), ("Proxy-Connection", "keep-alive")], "1.1", "GET http://e.com/ HTTP/1.1")
@example([("connection", "close"), ("HOST", "other"), ("proxy-x", "1")], "1.0", "GET http://e.com/ HTTP/1.0")
def test_the_one_pass_upstream_head_is_the_checked_render(
    fields: list[tuple[str, str]], version: str, request_line: str
) -> None:
    lines = [request_line, "Host: e.com"] + [f"{k}: {_value(k, c)}" for k, c in fields]
    try:
        got = http1.parse_request_head(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    except http1.HttpError:
        return
    assert got is not None
    head = got[0]
    want = http1.render_request_head(head.method, head.path, version, head.upstream_headers())
    assert head.render_upstream(version) == want
    # and what it drops: no Connection, no Proxy-*, one Host (the target's)
    sent = head.render_upstream(version).decode("latin-1").lower()
    assert "\r\nconnection: close" not in sent and "\r\nproxy-" not in sent
    assert sent.count("\r\nhost:") == 1


def test_a_clients_close_goes_upstream_without_its_connection_field() -> None:
    raw = b"GET http://127.0.0.1:8080/1k HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nConnection: close\r\n\r\n"
    got = http1.parse_request_head(raw)
    assert got is not None
    head = got[0]
    assert head.keep_alive is False
    assert head.render_upstream("1.1") == b"GET /1k HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"


# ---------------------------------------------------------------- response fields in any case

_RESPONSE_NAMES = st.sampled_from(
    ["content-length", "connection", "transfer-encoding", "te", "trailer", "keep-alive", "upgrade", "proxy-x",
     "content-type", "contentlength", "connections", "t", "c", "p", "proxy", "upgrades", "x-a", "date"]
)  # fmt: skip


@st.composite
def _cased(draw: Any, name: str) -> str:
    return "".join(ch.upper() if draw(st.booleans()) else ch for ch in name)


@FUZZ
@given(st.lists(_RESPONSE_NAMES.flatmap(_cased), min_size=1, max_size=6), st.sampled_from(["", " 1", ":", "\t,x"]))
def test_response_fields_are_told_in_any_letter_case(names: list[str], value: str) -> None:
    text = "HTTP/1.1 200 OK\r\n" + "\r\n".join(f"{n}:{value}" for n in names)
    lower = text.lower()
    start = 0
    for _ in names:
        start = text.index("\r\n", start) + 2
        assert http1._response_field(text, start) == http1._response_field(lower, start)
        for word, usual in (("content-length:", "Content-Length:"), ("te:", "TE:"), ("proxy-", "Proxy-")):
            assert http1._at(text, start, word, usual) == lower.startswith(word, start)


def test_a_response_head_is_lowered_only_when_a_field_is_asked_for() -> None:
    raw = b"HTTP/1.1 200 OK\r\nCONTENT-TYPE: text/plain\r\nContent-Length: 2\r\nconnection: keep-alive\r\n\r\nhi"
    got = http1.parse_response_head(raw)
    assert got is not None
    resp = got[0]
    assert resp.content_length == 2 and resp.keep_alive and resp.raw_keep_alive and resp.lower is None
    assert resp.header("content-type") == "text/plain"
    assert resp.lower == resp.text.lower()  # type: ignore[union-attr]


_STATUS = st.sampled_from(["HTTP/1.1 200 OK", "HTTP/1.0 200 OK", "HTTP/1.1 404 Not Found"])
_RESP_FIELDS = st.lists(
    st.sampled_from(
        ["Connection: keep-alive", "Connection: close", "Keep-Alive: timeout=5", "Content-Length: 3", "X-A: 1",
         "Proxy-X: 2", "connection: keep-alive", "Date: today"]
    ),
    max_size=4,
)  # fmt: skip


@FUZZ
@given(_STATUS, _RESP_FIELDS, st.booleans(), st.sampled_from([b"", b"abc", bytearray(b"xyz")]))
def test_a_head_rendered_with_its_body_is_the_head_then_the_body(
    status: str, fields: list[str], keep: bool, body: bytes
) -> None:
    raw = ("\r\n".join([status, *fields]) + "\r\n\r\n").encode("latin-1")
    try:
        got = http1.parse_response_head(raw)
    except http1.UpstreamError:
        return
    assert got is not None
    resp = got[0]
    head = http1.render_response_head(resp, keep)
    assert http1.render_response_head(resp, keep, body) == head + bytes(body)
    assert (b"\r\nconnection: keep-alive\r\n" if keep else b"\r\nconnection: close\r\n") in head.lower()


# ---------------------------------------------------------------- the upstream pool


class _Transport(asyncio.Transport):
    def __init__(self, peer: str = "192.0.2.1") -> None:
        super().__init__({"peername": (peer, 80)})
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


def _conn(peer: str = "192.0.2.1") -> Conn:
    c = Conn()
    c.connection_made(_Transport(peer))
    return c


A = ("alice", "example.com", 80)
B = ("bob", "example.com", 80)


def test_take_leaves_the_emptied_queue_for_the_next_put_and_bounds_skip_it() -> None:
    async def go() -> None:
        gate = Gate(Journal(), Publisher(), {1}, set(), 0.05, 10)  # type: ignore[arg-type]
        pool = UpstreamPool(per_key=4, total=2, idle_timeout=30)
        a = _conn()
        pool.put(A, a)
        assert pool.take(A, gate) is a and len(pool) == 0
        assert pool._idle[A] is not None and not pool._idle[A]  # emptied, kept
        pool.put(A, a)  # the same queue again
        assert pool.take(A, gate) is a
        # A total bound met with an emptied queue first in line: the oldest real connection goes.
        b1, b2, b3 = _conn(), _conn(), _conn()
        pool.put(B, b1)
        pool.put(B, b2)
        pool.put(A, b3)  # over the total: A's queue (emptied, then this one) is not the oldest
        assert len(pool) == 2 and b1.transport.is_closing() and not b2.transport.is_closing()  # type: ignore[union-attr]
        assert pool.take(B, gate) is b2 and pool.take(A, gate) is b3
        pool.close_all()

    asyncio.run(go())


def test_take_judges_a_parked_connection_by_the_gate() -> None:
    async def go() -> None:
        gate = Gate(Journal(), Publisher(), {1}, set(), 0.05, 10)  # type: ignore[arg-type]
        pool = UpstreamPool(per_key=4, total=16, idle_timeout=30)
        denied, other = _conn("192.0.2.1"), _conn("198.51.100.1")
        pool.put(A, other)
        pool.put(A, denied)
        gate.set_rules(RuleSet([Rule(1, "alice", "192.0.2.0/24", "*", "deny"), Rule(2, "*", "*", "*", "allow")]), 2)
        assert pool.take(A, gate) is other
        assert denied.transport.is_closing() and len(pool) == 0  # type: ignore[union-attr]

    asyncio.run(go())


def test_the_sweep_drops_emptied_queues() -> None:
    async def go() -> None:
        gate = Gate(Journal(), Publisher(), {1}, set(), 0.05, 10)  # type: ignore[arg-type]
        pool = UpstreamPool(per_key=4, total=16, idle_timeout=0.2)
        a, b = _conn(), _conn()
        a._bind_loop()
        pool.put(A, a)
        pool.put(B, b)
        assert pool.take(A, gate) is a
        for _ in range(100):
            if not pool._idle:
                break
            await asyncio.sleep(0.05)
        assert pool._idle == {} and b.transport.is_closing()  # type: ignore[union-attr]

    asyncio.run(go())


def test_parking_again_for_the_key_parked_last_keeps_the_order_of_the_keys() -> None:
    """`put` for the key parked last (a client with a connection per request) leaves it where it is,
    at the end; any other key moves to the end; the key parked last, once dropped, is inserted again:
    the total bound always drops the least recently parked key's connection."""

    async def go() -> list[bool]:
        C = ("carol", "example.com", 80)
        pool = UpstreamPool(per_key=4, total=2, idle_timeout=30)
        a1, b1, a2 = _conn(), _conn(), _conn()
        pool.put(A, a1)
        pool.put(B, b1)
        pool.put(A, a2)  # A moves behind B: B's connection is the oldest parked key's
        out = [b1.transport.is_closing(), list(pool._idle) == [A]]  # type: ignore[union-attr]
        pool.put(
            tuple(A), _conn()
        )  # (an equal key, not the same tuple) A is last already: over the total, A's oldest goes
        out += [a1.transport.is_closing(), list(pool._idle) == [A], len(pool) == 2]  # type: ignore[union-attr]
        pool.close_all()  # the key parked last is gone: parking for it inserts it again
        c1, a3, c2 = _conn(), _conn(), _conn()
        pool.put(A, a3)
        pool.put(C, c1)
        pool.put(C, c2)  # over the total: A (least recently parked) goes
        out += [a3.transport.is_closing(), list(pool._idle) == [C]]  # type: ignore[union-attr]
        pool.close_all()
        return out

    assert asyncio.run(go()) == [True, True, True, True, True, True, True]


def test_deadlines_find_each_timeouts_queue_however_timeouts_alternate() -> None:
    """`Deadlines.arm` finds the two timeouts armed last without a look-up: every cycle waits in its own
    timeout's queue, whatever the order the timeouts come in."""

    async def go() -> list[bool]:
        ctx = ProxyContext(Gate(Journal(), Publisher(), {1}, set(), 0.05, 10), Limits())  # type: ignore[arg-type]
        d = ctx.deadlines
        cycles = [_cycle(ctx, 0) for _ in range(8)]
        timeouts = [30.0, 600.0, 30.0, 5.0, 600.0, 5.0, 30.0, 600.0]
        for cycle, timeout in zip(cycles, timeouts):
            d.arm(cycle, timeout)
        d.arm(cycles[0], 5.0)  # moved to another queue
        timeouts[0] = 5.0
        out = [
            cycle._queue is d.queues[timeout][0] and cycle._timeout == timeout
            for cycle, timeout in zip(cycles, timeouts)
        ]
        out.append(sorted(d.timers) == [5.0, 30.0, 600.0] and len(d) == 8)
        for cycle in cycles:
            cycle.close()
        for entry in d.queues.values():
            if entry[1] is not None:
                entry[1].cancel()
        return out

    assert all(asyncio.run(go()))


# ---------------------------------------------------------------- the cycles' deadlines


class _Timed(keepalive.KeptAlive):
    """A request cycle whose deadline only counts (and waits once more, when told to)."""

    def _on_timer(self) -> None:
        self.fired.append(time.monotonic())  # type: ignore[attr-defined]
        if self.again:  # type: ignore[attr-defined]
            self.again -= 1  # type: ignore[attr-defined]
            self.deadlines.arm(self, 0.05)


def _cycle(ctx: ProxyContext, again: int) -> _Timed:
    client = ClientConn(ctx, lambda _c: None)  # type: ignore[arg-type,return-value]
    cycle = _Timed(client, lambda *_a: None, lambda *_a: True)  # type: ignore[arg-type]
    cycle.fired, cycle.again = [], again  # type: ignore[attr-defined]
    return cycle


def test_a_cycle_waiting_again_from_its_deadline_leaves_one_timer_and_none_early() -> None:
    async def go() -> None:
        loop = asyncio.get_running_loop()
        errors: list[Any] = []
        loop.set_exception_handler(lambda _l, ctx: errors.append(ctx))
        ctx = ProxyContext(Gate(Journal(), Publisher(), {1}, set(), 0.05, 10), Limits())  # type: ignore[arg-type]
        d = ctx.deadlines
        alone, pair = _cycle(ctx, 2), _cycle(ctx, 0)
        t0 = time.monotonic()
        d.arm(alone, 0.05)
        await asyncio.sleep(0.02)
        t1 = time.monotonic()
        d.arm(pair, 0.05)
        assert len(d.timers) == 1 and len(d) == 2
        for _ in range(200):
            if len(alone.fired) == 3:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert len(alone.fired) == 3 and len(pair.fired) == 1  # type: ignore[attr-defined]
        assert alone.fired[0] >= t0 + 0.05 - 0.001 and pair.fired[0] >= t1 + 0.05 - 0.001  # type: ignore[attr-defined]
        for before, after in zip(alone.fired, alone.fired[1:]):  # type: ignore[attr-defined]
            assert after >= before + 0.05 - 0.001
        assert len(d) == 0 and not errors  # (a second timer left behind would fire on a missing entry)

    asyncio.run(go())


# ---------------------------------------------------------------- a tracked request's close


def test_close_both_aborts_both_connections() -> None:
    a, b = _conn(), _conn()
    close = keepalive.close_both(a, b)  # type: ignore[arg-type]
    close()
    assert a.transport.is_closing() and b.transport.is_closing()  # type: ignore[union-attr]
