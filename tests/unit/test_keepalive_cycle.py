"""The HTTP forward proxy's kept-alive request cycle (services/proxy/keepalive.py), without sockets.

The real handler (`http_proxy.handle_http`) runs over `ClientConn`/`Conn` with in-memory
transports; the test plays the client (bytes fed to the client connection) and the origin (a
script of answer pieces per request path, each piece one read). What is checked:

- once a request has left a clean kept upstream, the next one is served inside the callbacks:
  the request is written upstream while the client's bytes are being delivered, and the answer
  and its record go out while the origin's bytes are (no task wakeup in between);
- for any sequence of requests and answers (hypothesis), the cycle sends the same bytes to the
  origin and to the client, ends the same connections and journals the same records as the
  handler's coroutine alone (the cycle off);
- what the cycle hands back: a hold (the request waits in the handler for the decision), a hook
  that waits, a rule change closing the connection, the idle and answer deadlines (504);
- a new connection begun in its callbacks (`http_proxy.begin_http`, as the service's listener
  starts it): its first request is served there on an upstream parked in the pool, with no handler
  task at all when nothing waits; and for any sequence of connections and requests, the same bytes,
  connection ends, records and counts as when every connection starts the handler's task at
  accept; the identity check (a claimed name: 407), the caps (429/503), holds, partial heads and the
  header deadline (408) handed to the handler.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from unittest import mock

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus import records
from greyproxy.identity import Claim, hash_secret
from greyproxy.policy import RuleSet
from greyproxy.policy.ruleset import Rule
from services.proxy import http_proxy, keepalive
from services.proxy.conn import Conn
from services.proxy.context import ClientConn, Limits, ProxyContext
from services.proxy.gate import Gate
from services.proxy.hooks import HookChain, Refusal, RuleRecheck
from services.proxy.identities import IdentityGuard
from services.proxy.mitm import Interceptor
from services.proxy.pipeline import Recorder
from services.proxy.upstream import UpstreamFailure

from harness.wire import Wire

OK = b"HTTP/1.1 200 OK\r\nServer: t\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
# What the origin answers, by request path: the pieces of the answer (each one read), then
# "close" (the origin closes) or nothing more.
SCRIPTS: dict[str, list[Any]] = {
    "/ok": [OK],
    "/split": [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\nhel", b"lo", b"world"],
    "/headsplit": [b"HTTP/1.1 200 OK\r\nContent-Le", b"ngth: 2\r\n\r\nhi"],
    "/chunked": [
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    ],
    "/close": [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nby", "close"],
    "/eof": [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil", b" close", "close"],
    "/early": [b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n", OK],
    "/304": [b'HTTP/1.1 304 Not Modified\r\nETag: "e"\r\n\r\n'],
    "/bad": [b"HTTP/1.1 2x0 Nope\r\n\r\n"],
    "/badbody": [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n"],
    "/hangup": ["close"],
    "/twice": [OK + OK],  # an answer more than asked for: the connection is not reused
    "/chunkedsplit": [
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        b"4\r\ndefg\r\n",
        b"0\r\n\r\n",
    ],
    "/cutbody": [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", b"de", "close"],  # the client is cut off
    "/badlater": [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", b"ZZ\r\n"],
}
MANUAL = "/manual"  # the origin says nothing: the test answers by hand
# Tunnel destinations whose upstream connect fails: (kind, message % (host, port)), as upstream.connect says
CONNECT_FAILURES = {
    "refused.tunnel.test": ("refused", "connection to %s:%d refused"),
    "slow.tunnel.test": ("timeout", "connecting to %s:%d timed out"),
    "guarded.tunnel.test": ("guard", "%s:%d resolves to this proxy's own listener"),
}


def _get(
    path: str, host: str = "ok.test", extra: bytes = b"", method: bytes = b"GET", version: bytes = b"1.1"
) -> bytes:
    return (
        method + b" http://" + host.encode() + path.encode() + b" HTTP/" + version + b"\r\n"
        b"Host: " + host.encode() + b"\r\nUser-Agent: t\r\n" + extra + b"\r\n"
    )


REQUESTS = [
    *[_get(p) for p in SCRIPTS],
    _get("/ok", method=b"HEAD"),
    _get("/ok", host="two.test"),
    _get("/ok", host="denied.test"),
    _get("/ok", extra=b"Connection: close\r\n"),
    _get("/ok", version=b"1.0"),
    _get("/ok", extra=b"Content-Length: 0\r\n"),
    _get("/ok", extra=b"Authorization: Bearer sk-secret-value\r\n"),
    b"POST http://ok.test/ok HTTP/1.1\r\nHost: ok.test\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nabc",
    b"PUT http://ok.test/hangup HTTP/1.1\r\nHost: ok.test\r\nContent-Length: 2\r\n\r\nhi",  # never sent twice
    b"POST http://ok.test/ok HTTP/1.1\r\nHost: ok.test\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    b"POST http://ok.test/split HTTP/1.1\r\nHost: ok.test\r\nContent-Length: 10\r\n\r\nonly",  # the rest later
    b"-rest-",
    b"GET https://ok.test/ok HTTP/1.1\r\nHost: ok.test\r\n\r\n",  # not http: 400 from the handler
    b"GET http://ok.test/ok HTTP/1.1\r\nHost: ok.test\r\nBad Field\r\n\r\n",  # malformed: 400
]


class Journal:
    def __init__(self) -> None:
        self.records: list[tuple[str, Any]] = []

    def append(self, kind: str, data: Any, record_id: str | None = None) -> str:
        data = orjson.loads(orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS))
        if kind == records.TRANSACTION:
            data = records.transaction_fields(data)
        self.records.append((kind, data))
        return str(len(self.records))

    def transactions(self) -> list[dict[str, Any]]:
        """The transaction records without what depends on the clock."""
        out = []
        for kind, rec in self.records:
            if kind == records.TRANSACTION:
                out.append({k: v for k, v in rec.items() if k not in ("timestamp", "duration_ms")})
        return out

    def kinds(self) -> list[str]:
        return [k for k, _ in self.records]


class Publisher:
    def publish(self, *_a: Any, **_k: Any) -> None:
        return None


RULES = [
    Rule(id=1, container_pattern="*", destination_pattern="ok.test"),
    Rule(id=2, container_pattern="*", destination_pattern="two.test"),
    Rule(id=3, container_pattern="*", destination_pattern="denied.test", action="deny"),
    Rule(id=4, container_pattern="*", destination_pattern="*.tunnel.test"),
]


class Proxy:
    """One client connection through the real handler, with scripted origins (`open`: another one,
    on the same proxy). `begin`: connections begin in their callbacks (as the service's listener
    starts them), else the handler's task starts at accept."""

    def __init__(self, limits: Limits | None = None, hooks: list[Any] | None = None, begin: bool = False) -> None:
        self.journal = Journal()
        self.gate = Gate(self.journal, Publisher(), {43051}, {"127.0.0.1"}, 5.0, 10)  # type: ignore[arg-type]
        self.gate.set_rules(RuleSet(list(RULES)), 1)
        self.ctx = ProxyContext(self.gate, limits or Limits(idle_timeout=2.0, header_timeout=2.0))
        self.ctx.recorder = Recorder(self.journal)  # type: ignore[arg-type]
        self.ctx.hooks = HookChain(hooks if hooks is not None else [RuleRecheck(self.gate)])
        self.origins: list[Wire] = []  # one per upstream connection, in the order opened
        self.begin = http_proxy.begin_http if begin else None
        self.open()

    def open(self) -> None:
        """A new client connection (`start` connects it)."""
        self.client = ClientConn(self.ctx, http_proxy.handle_http, self.begin)
        self.wire = Wire(self.client)

    async def connect(self, host: str, port: int, timeout: float, guard: Any, protocol: type[Conn] = Conn) -> Conn:
        failure = CONNECT_FAILURES.get(host)
        if failure is not None:
            await asyncio.sleep(0)
            raise UpstreamFailure(failure[0], failure[1] % (host, port))
        return self.origin(protocol)

    def origin(self, protocol: type[Conn] = Conn) -> Conn:
        """A new upstream connection (of `protocol`, as upstream.connect makes) to the scripted origin."""
        up = protocol()
        loop = asyncio.get_running_loop()

        def origin(data: bytes) -> None:
            line = data.split(b"\r\n", 1)[0].decode()
            if " /" not in line:
                return  # a request body
            method, path = line.split(" ")[:2]
            script = SCRIPTS.get(path, [OK]) if method != "HEAD" else [OK[: OK.index(b"\r\n\r\n") + 4]]
            if path == MANUAL:
                return
            # A few loop turns first: a request body the handler relays arrives before the answer.
            for i, piece in enumerate(script, 3):
                if piece == "close":
                    loop.call_soon(_later, i, up.transport.close)  # type: ignore[union-attr]
                else:
                    loop.call_soon(_later, i, up.data_received, piece)

        def _later(n: int, fn: Any, *args: Any) -> None:  # n loop turns later: each piece its own read
            if n:
                loop.call_soon(_later, n - 1, fn, *args)
            else:
                fn(*args)

        wire = Wire(up, origin)
        self.origins.append(wire)
        up.connection_made(wire)  # type: ignore[arg-type]
        return up

    def start(self) -> None:
        self.client.connection_made(self.wire)  # type: ignore[arg-type]

    def send(self, data: bytes) -> None:
        self.client.data_received(data)

    async def settle(self, turns: int = 60) -> None:
        for _ in range(turns):
            await asyncio.sleep(0)

    async def until(self, check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        """Until `check()` holds (work in a thread, such as scrypt, takes what the machine gives it)."""
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout} s: {what}")
            await asyncio.sleep(0.01)
        await self.settle()

    async def finish(self) -> None:
        """The client closes (unless it was closed); until the connection is over."""
        if not self.client.closed:
            self.wire.close()
        await self.ended()

    async def ended(self, timeout: float = 5.0) -> None:
        """Until the connection is over: its handler's task done (if one started), closed, not counted."""
        client = self.client
        async with asyncio.timeout(timeout):
            while True:
                if client.task is not None:
                    await client.task
                if client.closed and not client.counted and (client.task is None or client.task.done()):
                    return
                await asyncio.sleep(0.001)


def cycle_off() -> Any:
    """The cycle never serves: every request goes the handler's coroutine way (as before it)."""

    class Off(keepalive.KeptAlive):  # (compiled, KeptAlive is an extension type: its methods cannot be patched)
        def serve(self, *_a: Any) -> asyncio.Future:
            self.clean = True  # the upstream stays as the handler had it
            fut = self.loop.create_future()
            fut.set_result(keepalive.Handover(keepalive.READ))
            return fut

    return mock.patch.object(http_proxy, "KeptAlive", Off)


async def _run(batches: list[list[bytes]]) -> tuple[bytes, list[bytes], list[dict[str, Any]], list[str], bool]:
    """Each batch sent in one piece (pipelined), after the answers to the one before."""
    p = Proxy()
    with mock.patch.object(http_proxy, "connect", p.connect):
        p.start()
        for batch in batches:
            if p.client.closed:
                break
            p.send(b"".join(batch))
            await p.settle()
        closed = p.client.closed or p.wire.closing
        await p.finish()
    return bytes(p.wire.out), [bytes(o.out) for o in p.origins], p.journal.transactions(), p.journal.kinds(), closed


def both_ways(batches: list[list[bytes]]) -> tuple[Any, Any]:
    fast = asyncio.run(_run(batches))
    with cycle_off():
        slow = asyncio.run(_run(batches))
    return fast, slow


# ---------------------------------------------------------------- served in the callbacks


def test_a_kept_alive_request_is_served_inside_the_callbacks() -> None:
    async def main() -> None:
        p = Proxy()
        with mock.patch.object(http_proxy, "connect", p.connect):
            p.start()
            p.send(_get("/ok"))  # the first request: the handler's coroutine connects
            await p.settle()
            assert p.wire.out.count(b"hello") == 1
            (origin,) = p.origins
            sent, answered, recorded = len(origin.out), len(p.wire.out), len(p.journal.records)

            p.send(_get(MANUAL, extra=b"X-N: 2\r\n"))
            # written upstream before this call returned: no task ran in between
            assert origin.out[sent:].startswith(b"GET /manual HTTP/1.1\r\nHost: ok.test\r\n")
            assert b"X-N: 2\r\n" in origin.out[sent:]
            assert p.journal.kinds()[recorded:] == ["log"]  # the decision's log entry
            assert len(p.ctx.pool) == 0  # nothing parked: the upstream stays with this client
            p.origins[0].proto.data_received(OK)  # type: ignore[attr-defined]
            # the answer and its record went out in the origin's callback
            assert p.wire.out[answered:] == OK.replace(b"\r\n\r\n", b"\r\nConnection: keep-alive\r\n\r\n")
            assert p.journal.kinds()[recorded:] == ["log", "transaction"]
            rec = p.journal.transactions()[-1]
            assert (rec["url"], rec["status_code"], rec["response_body_size"]) == ("http://ok.test/manual", 200, 5)
            assert rec["request_headers"]["X-N"] == ["2"]

            # two pipelined requests: the second goes upstream once the first's answer is out
            sent = len(origin.out)
            p.send(_get(MANUAL, extra=b"X-N: 3\r\n") + _get(MANUAL, extra=b"X-N: 4\r\n"))
            assert origin.out[sent:].count(b"GET /manual") == 1 and b"X-N: 3" in origin.out[sent:]
            p.origins[0].proto.data_received(OK)  # type: ignore[attr-defined]
            assert origin.out[sent:].count(b"GET /manual") == 2 and b"X-N: 4" in origin.out[sent:]
            p.origins[0].proto.data_received(OK)  # type: ignore[attr-defined]
            assert p.wire.out.count(b"hello") == 4
            assert len(p.origins) == 1  # one upstream connection for all of them
            await p.finish()

    asyncio.run(main())


def test_a_buffered_request_body_goes_out_with_the_head_and_into_the_record() -> None:
    post = (
        b"POST http://ok.test/manual HTTP/1.1\r\nHost: ok.test\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\n"
    )

    async def main() -> None:
        p = Proxy()
        with mock.patch.object(http_proxy, "connect", p.connect):
            p.start()
            p.send(_get("/ok"))
            await p.settle()
            (origin,) = p.origins
            sent = len(origin.out)
            p.send(post + b"abc")  # all of it here: served in the callback, body with the head
            assert (
                origin.out[sent:]
                == b"POST /manual HTTP/1.1\r\nHost: ok.test\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nabc"
            )
            origin.proto.data_received(OK)  # type: ignore[attr-defined]
            rec = p.journal.transactions()[-1]
            assert (rec["method"], rec["request_body_size"]) == ("POST", 3) and rec["request_body"]
            sent = len(origin.out)
            p.send(post + b"a")  # not all here: the handler relays it
            assert origin.out[sent:] == b""
            await p.settle()
            p.send(b"bc")
            await p.settle()
            origin.proto.data_received(OK)  # type: ignore[attr-defined]
            await p.settle()
            assert origin.out[sent:].endswith(b"\r\n\r\nabc") and p.wire.out.count(b"hello") == 3
            txns = p.journal.transactions()  # the same record both ways (the body stored packed)
            assert txns[0]["request_body"] is None and txns[1]["request_body"] == txns[2]["request_body"]
            assert txns[1] == txns[2]
            await p.finish()

    asyncio.run(main())


def test_named_and_claimed_clients_are_served_inside_the_callbacks() -> None:
    """A client naming itself (Proxy-Authorization on every request, as curl sends it) and one using
    a claimed name with its secret: the cycle serves them once the check passed; a wrong secret
    later goes to the handler, which refuses it (407)."""

    def auth(user: str, secret: str) -> bytes:
        return b"Proxy-Authorization: Basic " + base64.b64encode(f"{user}:{secret}".encode()) + b"\r\n"

    async def main(user: str, secret: str) -> None:
        p = Proxy()
        executor = ThreadPoolExecutor(1)
        ids = IdentityGuard(executor, p.journal, Publisher(), p.gate)  # type: ignore[arg-type]
        ids.claims.replace([Claim("claimed-agent", hash_secret("s3cret"), 1)], 1)
        p.ctx.identities = ids
        try:
            with mock.patch.object(http_proxy, "connect", p.connect):
                p.start()
                p.send(_get("/ok", extra=auth(user, secret)))
                # (a claimed name's first check runs scrypt in a thread)
                await p.until(lambda: b"hello" in p.wire.out, "the first answer")
                assert p.wire.out.count(b"hello") == 1, p.wire.out
                (origin,) = p.origins
                sent = len(origin.out)
                p.send(_get(MANUAL, extra=auth(user, secret)))  # served in the callback
                assert origin.out[sent:].startswith(b"GET /manual HTTP/1.1\r\n")
                assert b"Proxy-Authorization" not in origin.out
                origin.proto.data_received(OK)  # type: ignore[attr-defined]
                assert p.wire.out.count(b"hello") == 2
                assert p.journal.transactions()[-1]["container_name"] == user
                sent = len(origin.out)
                p.send(_get(MANUAL, extra=auth(user, "wrong")))
                if user == "claimed-agent":
                    assert origin.out[sent:] == b""  # not from the callback: the handler checks it
                    await p.until(lambda: p.client.closed, "the refusal")
                    assert b"407 Proxy Authentication Required" in p.wire.out and p.client.closed
                else:  # an unclaimed name takes any secret: as check_identity, at once
                    assert origin.out[sent:].startswith(b"GET /manual")
                await p.finish()
        finally:
            executor.shutdown()

    asyncio.run(main("named-agent", "x"))
    asyncio.run(main("claimed-agent", "s3cret"))


# ---------------------------------------------------------------- same as the coroutine alone


def test_every_scripted_request_gives_the_same_bytes_and_records_both_ways() -> None:
    for req in REQUESTS:
        batches = [[_get("/ok")], [req], [_get("/ok")]]
        fast, slow = both_ways(batches)
        assert fast == slow, req


def test_pipelined_requests_give_the_same_bytes_and_records_both_ways() -> None:
    batch = [_get("/ok"), _get("/split"), _get("/chunked"), _get("/304"), _get("/ok", method=b"HEAD"), _get("/ok")]
    fast, slow = both_ways([[_get("/ok")], batch, batch[::-1]])
    assert fast == slow
    client, origins, txns, _kinds, closed = fast
    assert len(origins) == 1 and not closed
    assert len(txns) == 13 and client.count(b"HTTP/1.1 200 OK") == 11


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.sampled_from(REQUESTS), min_size=1, max_size=3), min_size=1, max_size=4))
def test_any_sequence_gives_the_same_bytes_and_records_both_ways(batches: list[list[bytes]]) -> None:
    fast, slow = both_ways([[_get("/ok")], *batches])
    assert fast == slow


# ---------------------------------------------------------------- what is handed back


def test_a_hold_on_a_kept_connection_waits_in_the_handler_for_the_decision() -> None:
    async def main() -> None:
        p = Proxy()
        with mock.patch.object(http_proxy, "connect", p.connect):
            p.start()
            p.send(_get("/ok"))
            await p.settle()
            # the allowing rule goes; no rule decides ok.test now: the next request is held
            p.gate.rules = RuleSet([r for r in RULES if r.id != 1])
            p.send(_get("/ok", extra=b"X-N: 2\r\n"))
            await p.settle()
            assert p.gate.waiting() == 1 and p.wire.out.count(b"hello") == 1
            p.gate.set_rules(RuleSet(list(RULES)), 2)  # allowed again: released
            await p.settle()
            assert p.gate.waiting() == 0 and p.wire.out.count(b"hello") == 2
            assert len(p.origins) == 1  # on the kept connection
            p.send(_get("/ok"))  # and the cycle serves the next one again
            await p.settle()
            assert p.wire.out.count(b"hello") == 3
            await p.finish()

    asyncio.run(main())


class WaitingHook:
    name = "waits"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, flow: Any) -> Any:
        self.calls += 1
        if flow.head.path != "/wait":
            return None

        async def later() -> Refusal | None:
            await asyncio.sleep(0.01)
            return Refusal(403, "rule", "no\n") if flow.head.header("x-refuse") else None

        return later()


def test_a_hook_that_waits_finishes_in_the_handler() -> None:
    async def main() -> None:
        hook = WaitingHook()
        p = Proxy(hooks=[hook])
        with mock.patch.object(http_proxy, "connect", p.connect):
            p.start()
            p.send(_get("/ok"))
            await p.settle()
            p.send(_get("/wait"))
            await asyncio.sleep(0.05)
            await p.settle()
            assert p.wire.out.count(b"hello") == 2 and len(p.origins) == 1
            p.send(_get("/wait", extra=b"X-Refuse: 1\r\n"))
            await asyncio.sleep(0.05)
            await asyncio.wait_for(p.client.task, 5)  # type: ignore[arg-type]  # refused: the connection ends
            assert p.wire.out.endswith(b"no\n") and b"403" in p.wire.out
            assert [t["status_code"] for t in p.journal.transactions()] == [200, 200, 403]
            assert hook.calls == 3

    asyncio.run(main())


def test_a_rule_change_closes_a_kept_connection_waiting_in_the_callbacks() -> None:
    async def main() -> None:
        p = Proxy()
        with mock.patch.object(http_proxy, "connect", p.connect):
            p.start()
            p.send(_get("/ok"))
            await p.settle()
            assert len(p.gate.live) == 1
            p.gate.set_rules(RuleSet([r for r in RULES if r.id != 1]), 2)  # the allowing rule deleted
            await asyncio.wait_for(p.client.task, 5)  # type: ignore[arg-type]
            assert p.client.closed and p.origins[0].closing and len(p.ctx.pool) == 0 and not p.gate.live

    asyncio.run(main())


def test_idle_and_answer_deadlines_in_the_callbacks() -> None:
    async def main() -> None:
        p = Proxy(Limits(idle_timeout=0.05, header_timeout=1.0))
        with mock.patch.object(http_proxy, "connect", p.connect):
            p.start()
            p.send(_get("/ok"))
            await p.settle()
            # the origin says nothing: 504 from the cycle, the client stays, the upstream is dropped
            SCRIPTS["/silent"] = []
            try:
                p.send(_get("/silent"))
                for _ in range(200):
                    if b"504" in p.wire.out:
                        break
                    await asyncio.sleep(0.005)
            finally:
                del SCRIPTS["/silent"]
            assert b"HTTP/1.1 504 Gateway Timeout" in p.wire.out and not p.client.closed
            assert p.origins[0].closing
            rec = p.journal.transactions()[-1]
            assert (rec["status_code"], rec["error"]) == (504, "the upstream did not answer in time")
            # the next request on a new upstream connection
            p.send(_get("/ok"))
            await p.settle()
            assert len(p.origins) == 2 and p.wire.out.endswith(b"hello")
            # then nothing more from the client: closed after idle_timeout, without a 408
            before = len(p.wire.out)
            await asyncio.wait_for(p.client.task, 1)  # type: ignore[arg-type]
            assert p.client.closed and len(p.wire.out) == before
            assert len(p.ctx.pool) == 1  # the clean upstream was parked

    asyncio.run(main())


def test_a_body_over_several_reads_streams_from_the_callbacks_and_stalls_like_the_relay() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\n"

    async def main() -> None:
        p = Proxy(Limits(idle_timeout=0.05, header_timeout=1.0))
        with mock.patch.object(http_proxy, "connect", p.connect):
            p.start()
            p.send(_get("/ok"))
            await p.settle()
            (origin,) = p.origins
            up = origin.proto
            p.send(_get(MANUAL))
            answered = len(p.wire.out)
            up.data_received(head + b"hel")  # type: ignore[attr-defined]
            assert p.wire.out[answered:].endswith(b"\r\n\r\nhel")
            up.data_received(b"lo")  # type: ignore[attr-defined]  # on to the client at once
            assert p.wire.out.endswith(b"hello")
            up.data_received(b"world")  # type: ignore[attr-defined]
            assert p.wire.out.endswith(b"helloworld") and p.journal.transactions()[-1]["response_body_size"] == 10
            # a full client buffer: the handler waits for the client, then relays the rest
            p.send(_get(MANUAL))
            up.data_received(head + b"abc")  # type: ignore[attr-defined]
            p.client.pause_writing()
            up.data_received(b"de")  # type: ignore[attr-defined]
            await p.settle()
            up.data_received(b"fgh")  # type: ignore[attr-defined]
            await p.settle()
            assert p.wire.out.endswith(b"abcde")  # the rest waits until the client's buffer drains
            p.client.resume_writing()
            await p.settle()
            assert p.wire.out.endswith(b"abcdefgh")
            up.data_received(b"ij")  # type: ignore[attr-defined]
            await p.settle()
            assert p.wire.out.endswith(b"abcdefghij") and p.journal.transactions()[-1]["error"] is None
            # back in the cycle: a body that stalls is cut off at the deadline, as the relay does
            p.send(_get(MANUAL))
            await p.settle()
            assert origin.out.endswith(b"GET /manual HTTP/1.1\r\nHost: ok.test\r\nUser-Agent: t\r\n\r\n")
            up.data_received(head + b"abc")  # type: ignore[attr-defined]
            await asyncio.wait_for(p.client.task, 1)  # type: ignore[arg-type]
            rec = p.journal.transactions()[-1]
            assert rec["error"] == "the upstream stalled in the middle of the response body"
            assert p.client.closed and origin.closing and len(p.ctx.pool) == 0

    asyncio.run(main())


def test_a_partial_head_is_read_by_the_handler_under_the_header_deadline() -> None:
    async def main() -> None:
        p = Proxy(Limits(idle_timeout=5.0, header_timeout=0.05))
        with mock.patch.object(http_proxy, "connect", p.connect):
            p.start()
            p.send(_get("/ok"))
            await p.settle()
            p.send(b"GET http://ok.test/ok HTTP/1.1\r\nHo")
            await p.settle()
            p.send(b"st: ok.test\r\n\r\n")  # completed in time: answered
            await p.settle()
            assert p.wire.out.count(b"hello") == 2
            p.send(b"GET http://ok.test/ok HTTP/1.1\r\n")  # never completed: 408 at the header deadline
            await asyncio.wait_for(p.client.task, 1)  # type: ignore[arg-type]
            assert b"408 Request Timeout" in p.wire.out

    asyncio.run(main())


# ---------------------------------------------------------------- a new connection, begun in its callbacks


def _observed(p: Proxy) -> dict[str, Any]:
    """What both ways must agree on after a run: the origins' bytes, the records (without the clock),
    the counts left behind."""
    logs = [[x for x in rec if not isinstance(x, float)] for kind, rec in p.journal.records if kind == records.LOG]
    return {
        "origins": [bytes(o.out) for o in p.origins],
        "transactions": p.journal.transactions(),
        "logs": logs,
        "kinds": p.journal.kinds(),
        "active": p.ctx.active,
        "per_client": dict(p.ctx.per_client),
        "pool": len(p.ctx.pool),
        "live": len(p.gate.live),
        "refused": dict(p.ctx.refused),
    }


async def _connections(conns: list[list[bytes]], begin: bool, limits: Limits | None = None) -> dict[str, Any]:
    """One client connection after another on the same proxy (its pool carries upstreams from one
    to the next); each piece sent on its own, after the answers to the one before."""
    p = Proxy(limits, begin=begin)
    clients = []
    with mock.patch.object(http_proxy, "connect", p.connect):
        for i, pieces in enumerate(conns):
            if i:
                p.open()
            p.start()
            for piece in pieces:
                if p.client.closed:
                    break
                p.send(piece)
                await p.settle()
            closed = p.client.closed or p.wire.closing
            await p.finish()
            clients.append((bytes(p.wire.out), closed))
    return {"clients": clients, **_observed(p)}


def connections_both_ways(conns: list[list[bytes]], limits: Limits | None = None) -> tuple[Any, Any]:
    new = asyncio.run(_connections(conns, True, limits))
    old = asyncio.run(_connections(conns, False, limits))
    return new, old


def _auth(user: str, secret: str) -> bytes:
    return b"Proxy-Authorization: Basic " + base64.b64encode(f"{user}:{secret}".encode()) + b"\r\n"


CLOSE = b"Connection: close\r\n"
FIRST_REQUESTS = [
    *REQUESTS,
    _get("/ok", extra=CLOSE),
    _get("/split", extra=CLOSE),
    _get("/ok", host="two.test", extra=CLOSE),
    _get("/ok", extra=_auth("named-agent", "x")),
    _get("/ok", extra=_auth("named-agent", "x") + CLOSE),
    b"GET http://ok.test/ok HTTP/1.1\r\nHo",  # a partial head (completed, or not, by what follows)
    b"st: ok.test\r\n\r\n",
]


def test_a_new_connections_first_request_is_served_in_the_callbacks_on_a_parked_upstream() -> None:
    async def main() -> None:
        p = Proxy(begin=True)
        with mock.patch.object(http_proxy, "connect", p.connect):
            p.start()
            p.send(_get("/ok"))  # nothing parked yet: the handler connects
            await p.settle()
            assert p.wire.out.endswith(b"hello") and p.client.task is not None
            await p.finish()
            assert len(p.ctx.pool) == 1 and p.ctx.active == 0  # the clean upstream was parked

            p.open()
            p.start()
            (origin,) = p.origins
            sent = len(origin.out)
            p.send(_get(MANUAL, extra=b"X-N: 2\r\n"))
            # written on the parked upstream before this call returned: no task, nothing awaited
            assert origin.out[sent:].startswith(b"GET /manual HTTP/1.1\r\nHost: ok.test\r\n")
            assert p.client.task is None and len(p.ctx.pool) == 0 and len(p.gate.live) == 1
            assert p.ctx.per_client == {"unknown-127.0.0.1": 1} and p.ctx.active == 1
            origin.proto.data_received(OK)  # type: ignore[attr-defined]
            assert p.wire.out == OK.replace(b"\r\n\r\n", b"\r\nConnection: keep-alive\r\n\r\n")
            assert p.journal.kinds()[-2:] == ["log", "transaction"]
            assert p.journal.transactions()[-1]["url"] == "http://ok.test/manual"
            # the next one on the same connection, ending it: still no task, the connection done
            p.send(_get(MANUAL, extra=CLOSE))
            origin.proto.data_received(OK)  # type: ignore[attr-defined]
            assert p.wire.out.endswith(b"Connection: close\r\n\r\nhello") and p.wire.closing
            assert p.client.task is None and not p.client.counted and p.ctx.active == 0
            assert p.ctx.per_client == {} and not p.gate.live and len(p.ctx.pool) == 1  # parked again
            assert len(p.origins) == 1 and p.ctx.pool.stats()["reused"] == 1
            await p.ended()

    asyncio.run(main())


def test_a_new_connection_that_closes_or_says_nothing() -> None:
    """Closed before a byte: ended in the callbacks, no answer. Nothing by the header deadline (from
    accept): 408 from the handler, as its own read answers it."""

    async def main() -> None:
        p = Proxy(Limits(idle_timeout=5.0, header_timeout=0.05), begin=True)
        p.start()
        p.client.eof_received()
        p.wire.close()
        await p.ended()
        assert p.client.task is None and p.wire.out == b"" and p.ctx.active == 0
        p.open()
        p.start()
        await asyncio.sleep(0.03)
        assert p.client.task is None and p.wire.out == b""
        await p.ended(1.0)
        assert p.wire.out.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and p.client.task is not None
        assert p.ctx.active == 0 and len(p.ctx.deadlines) == 0

    asyncio.run(main())


def test_new_connections_give_the_same_bytes_records_and_counts_both_ways() -> None:
    cases = [
        [[_get("/ok")], [_get("/ok")], [_get("/ok", extra=CLOSE)]],
        [[_get("/ok", extra=CLOSE)], [_get("/ok", extra=CLOSE)], [_get("/split", extra=CLOSE)]],
        [[_get("/ok")], [_get("/close")], [_get("/ok")], [_get("/hangup")], [_get("/ok")]],
        [[_get("/ok")], [_get("/ok", host="denied.test")], [_get("/ok", host="two.test")]],
        [[_get("/ok")], [b"GET https://ok.test/ok HTTP/1.1\r\nHost: ok.test\r\n\r\n"], [_get("/ok")]],
        [[_get("/ok")], [FIRST_REQUESTS[-2], FIRST_REQUESTS[-1]], [FIRST_REQUESTS[-2]]],
        [[_get("/ok")], [_get("/ok", extra=_auth("named-agent", "x"))], [_get("/ok", extra=_auth("named-agent", "y"))]],
        [[_get("/ok")], [REQUESTS[-6]], [REQUESTS[-5], REQUESTS[-4]], [_get("/ok") + _get("/split")]],
    ]
    for conns in cases:
        new, old = connections_both_ways(conns)
        assert new == old, conns
    # and the first of them was served in the callbacks: its upstream was reused
    assert new["clients"][0][0].endswith(b"hello")


PIECE = st.one_of(
    st.sampled_from(FIRST_REQUESTS),
    st.tuples(st.sampled_from(FIRST_REQUESTS), st.sampled_from(FIRST_REQUESTS)).map(b"".join),  # pipelined
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(PIECE, min_size=1, max_size=3), min_size=1, max_size=4))
def test_any_sequence_of_new_connections_gives_the_same_both_ways(conns: list[list[bytes]]) -> None:
    """A connection that parks an upstream, then connections each sending its pieces in turn."""
    new, old = connections_both_ways([[_get("/ok")], *conns])
    assert new == old


def test_a_first_request_that_needs_a_hold_waits_in_the_handler() -> None:
    async def run(begin: bool) -> tuple[Any, ...]:
        p = Proxy(begin=begin)
        with mock.patch.object(http_proxy, "connect", p.connect):
            p.start()
            p.send(_get("/ok"))
            await p.settle()
            await p.finish()
            p.gate.rules = RuleSet([r for r in RULES if r.id != 1])  # no rule decides ok.test now
            p.open()
            p.start()
            p.send(_get("/ok", extra=b"X-N: 2\r\n"))
            await p.settle()
            held = (p.gate.waiting(), p.client.task is not None, p.wire.out.count(b"hello"))
            p.gate.set_rules(RuleSet(list(RULES)), 2)  # allowed: released
            await p.settle()
            p.send(_get("/ok", extra=CLOSE))
            await p.settle()
            await p.ended()
        return held, bytes(p.wire.out), _observed(p)

    new, old = asyncio.run(run(True)), asyncio.run(run(False))
    assert new[0] == (1, True, 0)  # held in the handler's task (begun in the callbacks, handed over)
    assert new[1:] == old[1:]
    assert new[1].count(b"hello") == 2 and len(new[2]["origins"]) == 1  # on the parked upstream


def test_a_first_request_judged_by_its_addresses_looks_them_up_in_the_handler() -> None:
    """An address rule makes the gate look the name up (with its deadline, which needs a task): the
    step begun in the callbacks waits for the lookup like any other wait and goes on in the handler,
    with the same answers as a handler started at accept (it raised "Timeout should be used inside a
    task" before)."""
    rules = [
        *RULES,
        Rule(id=14, container_pattern="*", destination_pattern="localhost"),
        Rule(id=15, container_pattern="*", destination_pattern="127.0.0.0/8", port_pattern="81", action="deny"),
        Rule(id=16, container_pattern="*", destination_pattern="10.0.0.0/8", port_pattern="82", action="deny"),
    ]
    asks = [_get("/ok", host=h, extra=CLOSE) for h in ("localhost:81", "localhost:82", "localhost:82")]

    async def run(begin: bool) -> tuple[list[bytes], dict[str, Any]]:
        p = Proxy(begin=begin)
        p.gate.set_rules(RuleSet(rules), 2)
        answers = []
        with mock.patch.object(http_proxy, "connect", p.connect):
            for i, ask in enumerate(asks):
                if i:
                    p.open()
                p.start()
                # from a loop callback, as a transport delivers it: no current task
                asyncio.get_running_loop().call_soon(p.send, ask)
                for _ in range(100):  # the lookup runs in the resolver's thread
                    await p.settle(5)
                    if p.wire.closing or p.client.closed:
                        break
                    await asyncio.sleep(0.005)
                await p.finish()
                answers.append(bytes(p.wire.out))
        return answers, _observed(p)

    new, old = asyncio.run(run(True)), asyncio.run(run(False))
    assert new == old
    denied, allowed, again = new[0]
    assert denied.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert allowed.endswith(b"hello") and again.endswith(b"hello")


def test_claimed_names_on_new_connections() -> None:
    """A claimed name's secret is verified once (scrypt, in the handler); later connections presenting
    it are served in the callbacks; a wrong secret is refused by the handler (407): the same both ways."""

    async def run(begin: bool) -> tuple[Any, ...]:
        p = Proxy(begin=begin)
        executor = ThreadPoolExecutor(1)
        ids = IdentityGuard(executor, p.journal, Publisher(), p.gate)  # type: ignore[arg-type]
        ids.claims.replace([Claim("claimed-agent", hash_secret("s3cret"), 1)], 1)
        p.ctx.identities = ids
        outs, tasks = [], []
        try:
            with mock.patch.object(http_proxy, "connect", p.connect):
                for secret in ("s3cret", "s3cret", "wrong", "s3cret", None):
                    if outs:
                        p.open()
                    p.start()
                    extra = _auth("claimed-agent", secret) if secret else b""
                    p.send(_get("/ok", extra=extra + CLOSE))
                    await asyncio.sleep(0.2)  # a first check runs scrypt in a thread
                    await p.settle()
                    await p.ended()
                    outs.append(bytes(p.wire.out))
                    tasks.append(p.client.task is not None)
        finally:
            executor.shutdown()
        return outs, tasks, ids.refused, _observed(p)

    new, old = asyncio.run(run(True)), asyncio.run(run(False))
    outs, tasks, refused, _ = new
    assert outs[0].endswith(b"hello") and outs[1].endswith(b"hello") and outs[3].endswith(b"hello")
    assert b"407 Proxy Authentication Required" in outs[2] and refused == 1
    assert outs[4].endswith(b"hello")  # no name given: the default identity, unclaimed
    # scrypt and the refusal in the handler; and the default identity has no upstream parked: it connects
    assert tasks == [True, False, True, False, True]
    assert (outs, refused, new[3]) == (old[0], old[2], old[3])


def test_connection_caps_on_new_connections_answer_as_the_handler() -> None:
    """Past the per-client cap (429) and the overall one (503): refused by the handler's count, the
    same bytes and counts both ways; the connection that holds the slot is served in the callbacks."""

    async def run(begin: bool, limits: Limits) -> tuple[Any, ...]:
        p = Proxy(limits, begin=begin)
        with mock.patch.object(http_proxy, "connect", p.connect):
            p.start()
            p.send(_get("/ok"))
            await p.settle()
            await p.finish()  # an upstream parked
            p.open()
            p.start()
            p.send(_get("/ok"))  # holds the slot, kept open
            await p.settle()
            holder, holder_wire = p.client, p.wire
            p.open()
            p.start()
            p.send(_get("/ok"))
            await p.settle()
            await p.ended()
            refused = bytes(p.wire.out)
            holder_out = bytes(holder_wire.out)
            holder_wire.close()
            await p.settle()
            assert holder.closed and not holder.counted
        return refused, holder_out, _observed(p)

    for limits, status in (
        (Limits(idle_timeout=2.0, header_timeout=2.0, max_per_client=1), b"429 Too Many Requests"),
        (Limits(idle_timeout=2.0, header_timeout=2.0, max_connections=1), b"503 Service Unavailable"),
    ):
        new, old = asyncio.run(run(True, limits)), asyncio.run(run(False, limits))
        assert new[0].startswith(b"HTTP/1.1 " + status) and new[1].endswith(b"hello")
        assert new == old


def test_partial_first_heads_and_the_header_deadline_both_ways() -> None:
    """A first head over several reads goes to the handler, under the deadline counted from accept."""

    async def run(begin: bool, pieces: list[tuple[float, bytes]]) -> tuple[Any, ...]:
        p = Proxy(Limits(idle_timeout=5.0, header_timeout=0.1), begin=begin)
        with mock.patch.object(http_proxy, "connect", p.connect):
            p.start()
            p.send(_get("/ok"))
            await p.settle()
            await p.finish()
            p.open()
            p.start()
            for delay, piece in pieces:
                await asyncio.sleep(delay)
                if not p.client.closed:
                    p.send(piece)
                await p.settle()
            await p.ended(2.0)
        return bytes(p.wire.out), _observed(p)

    head = _get("/ok", extra=CLOSE)
    for pieces in (
        [(0.0, head[:10]), (0.02, head[10:])],  # completed in time: answered
        [(0.0, head[:10]), (0.15, head[10:])],  # not: 408
        [(0.06, head[:10]), (0.06, head[10:])],  # the deadline runs from accept, not the first byte: 408
        [(0.0, b"GET http://ok.test/ok HTTP/1.1\r\nBad Field\r\n\r\n")],  # malformed: 400
    ):
        new, old = asyncio.run(run(True, pieces)), asyncio.run(run(False, pieces))
        assert new == old, pieces
    assert new[0].startswith(b"HTTP/1.1 400 ")


def test_a_connection_served_in_its_callbacks_leaves_no_reference_cycle() -> None:
    async def main() -> None:
        p = Proxy(begin=True)
        with mock.patch.object(http_proxy, "connect", p.connect):
            p.start()
            p.send(_get("/ok", extra=CLOSE))
            await p.settle()
            await p.ended()
            for _ in range(3):
                p.open()
                p.start()
                p.send(_get("/ok", extra=CLOSE))
                await p.settle()
                await p.ended()
                assert p.client.task is None
                p.wire.proto = None  # (the test's transport and the connection refer to each other)

    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        asyncio.run(main())
        gc.collect()
        left = sum(isinstance(o, keepalive.KeptAlive) for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == 0


def test_waiting_connections_share_one_timer_and_each_keeps_its_deadline() -> None:
    """Silent new connections opened one after another: one timer for their header deadline, and
    each gets its 408 when its own deadline comes (not the first one's, not late)."""

    async def main() -> None:
        p = Proxy(Limits(idle_timeout=5.0, header_timeout=0.3), begin=True)
        loop = asyncio.get_running_loop()
        opened: list[tuple[float, Wire, ClientConn]] = []
        for _ in range(3):
            p.open()
            p.start()
            opened.append((loop.time(), p.wire, p.client))
            if len(opened) < 3:
                await asyncio.sleep(0.1)
        assert len(p.ctx.deadlines) == 3 and len(p.ctx.deadlines.timers) == 1
        answered: dict[int, float] = {}
        while len(answered) < 3 and loop.time() < opened[0][0] + 2:
            for i, (_t, wire, _c) in enumerate(opened):
                if i not in answered and wire.out:
                    answered[i] = loop.time()
            await asyncio.sleep(0.002)
        for i, (t, wire, client) in enumerate(opened):
            assert wire.out.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
            assert t + 0.3 - 0.002 <= answered[i] <= t + 0.3 + 0.06, (i, answered[i] - t)
            p.client = client
            await p.ended()
        assert len(p.ctx.deadlines) == 0 and p.ctx.active == 0

    asyncio.run(main())


# ---------------------------------------------------------------- a new CONNECT in the callbacks


class ConnectingTo:
    """`upstream.Connecting` for the tests: the scripted origin (`Proxy.origin`) a loop turn later, the
    same failures as `Proxy.connect`; a name whose addresses are not cached (`lookup.`) is not started,
    one whose cached addresses all failed (`moved.`) says so: both go to the handler's `connect`."""

    def __init__(self, p: Proxy, host: str, port: int, timeout: float, guard: Any, done: Any, loop: Any) -> None:
        self.p, self.host, self.port, self.done, self.loop = p, host, port, done, loop

    def start(self) -> bool:
        if self.host.startswith("lookup."):
            return False
        self.loop.call_soon(self._over)
        return True

    def _over(self) -> None:
        failure = CONNECT_FAILURES.get(self.host)
        if failure is not None:
            self.done(None, UpstreamFailure(failure[0], failure[1] % (self.host, self.port)))
        elif self.host.startswith("moved."):
            self.done(None, None)
        else:
            self.done(self.p.origin(), None)


def _connect_head(host: str, extra: bytes = b"") -> bytes:
    return b"CONNECT %s:443 HTTP/1.1\r\nHost: %s:443\r\n%s\r\n" % (host.encode(), host.encode(), extra)


INSIDE = b"GET /ok HTTP/1.1\r\nHost: ok.test\r\n\r\n"  # plain HTTP through the tunnel
HELLO = bytes.fromhex("16030100") + b"\x00\x05hello"  # a TLS record that is no ClientHello: "other"
TUNNELS = [
    [_connect_head("ok.test"), INSIDE],
    [_connect_head("ok.test") + INSIDE],  # the first bytes right behind the head
    [_connect_head("ok.tunnel.test"), b"SSH-2.0-test\r\n"],
    [_connect_head("ok.test"), HELLO],
    [_connect_head("denied.test")],
    [_connect_head("refused.tunnel.test")],
    [_connect_head("slow.tunnel.test")],
    [_connect_head("guarded.tunnel.test")],
    [_connect_head("lookup.tunnel.test"), INSIDE],
    [_connect_head("moved.tunnel.test"), INSIDE],
    [_connect_head("ok.test", _auth("named-agent", "x")), INSIDE],
    [_get("/ok"), _connect_head("ok.test"), INSIDE],  # after a plain request: the handler's
    [b"CONNECT ok.test:443 HTTP/1.1\r\nHo", b"st: ok.test:443\r\n\r\n", INSIDE],  # a partial head
    [_connect_head("ok.test"), b""],  # nobody speaks (the look waits, then the client closes)
]


def _interceptor(p: Proxy, mitm: bool, tmp: Any, kind: Any = None) -> Any:
    """The service's tunnel hook (`kind`: a subclass of Interceptor instead, its look found by name)."""
    from greyproxy.certs import CAWatcher
    from services.proxy.mitm import Interceptor

    class Settings:
        def on_change(self, fn: Any) -> None:
            fn({"mitmEnabled": mitm})

    certs = CAWatcher(tmp)
    certs.check()
    p.gate.defer_tunnel_logs = True
    return (kind or Interceptor)(p.gate, p.ctx.recorder, certs, Settings(), [])  # type: ignore[arg-type]


async def _tunnels(
    conns: list[list[bytes]], begin: bool, hook: str, tmp: Any, limits: Limits | None = None, ids: bool = False
) -> dict[str, Any]:
    """One client connection after another (pieces sent in turn); `hook`: none, off (interception
    off: looked at and spliced), on (plain HTTP inside is intercepted)."""
    p = Proxy(limits, begin=begin)
    if hook != "none":
        p.ctx.tunnel_hook = _interceptor(p, hook == "on", tmp)
    executor = ThreadPoolExecutor(1)
    if ids:
        guard = IdentityGuard(executor, p.journal, Publisher(), p.gate)  # type: ignore[arg-type]
        guard.claims.replace([Claim("claimed-agent", hash_secret("s3cret"), 1)], 1)
        p.ctx.identities = guard
    clients = []
    try:
        with (
            mock.patch.object(http_proxy, "connect", p.connect),
            mock.patch.object(keepalive, "Connecting", lambda *a: ConnectingTo(p, *a)),
        ):
            for i, pieces in enumerate(conns):
                if i:
                    p.open()
                p.start()
                for piece in pieces:
                    if p.client.closed:
                        break
                    if piece:
                        p.send(piece)
                    await p.settle()
                    if ids:
                        await asyncio.sleep(0.2)  # a first check runs scrypt in a thread
                        await p.settle()
                task = p.client.task is not None
                await p.finish()
                clients.append((bytes(p.wire.out), task))
    finally:
        executor.shutdown()
    return {"clients": clients, **_observed(p)}


def tunnels_both_ways(conns: list[list[bytes]], tmp: Any, hook: str = "off", **kw: Any) -> tuple[Any, Any]:
    new = asyncio.run(_tunnels(conns, True, hook, tmp, **kw))
    old = asyncio.run(_tunnels(conns, False, hook, tmp, **kw))
    return new, old


def _without_tasks(run: dict[str, Any]) -> dict[str, Any]:
    return {**run, "clients": [out for out, _task in run["clients"]]}


def test_a_new_connect_is_served_in_the_callbacks_with_no_task(tmp_path: Any) -> None:
    """Admitted, connected, answered 200, looked at and spliced without the handler's task; the
    same bytes, records (the deferred log entry with its skip reason) and counts as the handler."""
    for hook in ("none", "off"):
        conns = [[_connect_head("ok.test"), INSIDE], [_connect_head("ok.test") + INSIDE]]
        new, old = tunnels_both_ways(conns, tmp_path, hook)
        assert _without_tasks(new) == _without_tasks(old)
        for out, task in new["clients"]:
            assert out == b"HTTP/1.1 200 Connection established\r\n\r\n" + OK and not task
        assert all(task for _out, task in old["clients"])
        assert new["active"] == 0 and new["live"] == 0
    logs = new["logs"]
    assert len(logs) == 2 and all("mitm_disabled" in rec for rec in logs)  # the look's skip reason


def test_every_tunnel_case_gives_the_same_bytes_and_records_both_ways(tmp_path: Any) -> None:
    for hook in ("none", "off", "on"):
        for conns in TUNNELS:
            new, old = tunnels_both_ways([conns], tmp_path, hook)
            assert _without_tasks(new) == _without_tasks(old), (hook, conns)
    # and in one run on one proxy, one connection after another
    new, old = tunnels_both_ways(TUNNELS, tmp_path, "on")
    assert _without_tasks(new) == _without_tasks(old)
    answers = [out.split(b"\r\n", 1)[0] for out, _task in new["clients"]]
    assert answers[4:8] == [
        b"HTTP/1.1 403 Forbidden",
        b"HTTP/1.1 502 Bad Gateway",
        b"HTTP/1.1 504 Gateway Timeout",
        b"HTTP/1.1 403 Forbidden",
    ]
    # intercepted (a second wait) and names to look up go to the handler's task; failures do not
    tasks = [task for _out, task in new["clients"]]
    assert tasks[0] and not tasks[2] and not tasks[4] and not tasks[5] and tasks[8] and tasks[9]


class _SubInterceptor(Interceptor):
    """A hook deriving from the service's: its look is found by name (`first_look`), not called as
    the Interceptor's C method."""


@pytest.mark.parametrize("kind", [None, _SubInterceptor])
def test_a_new_tunnel_is_looked_at_from_the_callbacks_with_no_coroutine(tmp_path: Any, kind: Any) -> None:
    """While nobody has spoken the interceptor's look waits in the connections' callbacks (its
    `first_look`, asked again on every byte, EOF or close): no `run_tunnel` coroutine, no future;
    its deadline waits in the looks' queue (`keepalive._LOOKS`), not in the cycles' `Deadlines`."""

    async def run() -> tuple[Any, ...]:
        p = Proxy(begin=True)
        p.ctx.tunnel_hook = _interceptor(p, False, tmp_path, kind)
        with mock.patch.object(keepalive, "Connecting", lambda *a: ConnectingTo(p, *a)):
            p.start()
            p.send(_connect_head("ok.test"))
            await p.settle()
            cycle = p.client.cycle
            looking = (cycle.looked is not None, cycle.tunnel, p.client._waiter, p.client.task, len(p.gate.live))
            queued = (list(keepalive._LOOKS.waiting) == [cycle], len(p.ctx.deadlines))
            p.send(INSIDE)
            await p.settle()
            after = (p.client.cycle, p.client.detached, bytes(p.wire.out), len(keepalive._LOOKS.waiting))
            await p.finish()
        return looking, queued, after, _observed(p)

    looking, queued, after, observed = asyncio.run(run())
    assert looking == (True, None, None, None, 1)  # looked at, tracked; nothing awaits
    assert queued == (True, 0)
    assert after == (None, True, b"HTTP/1.1 200 Connection established\r\n\r\n" + OK, 0)  # spliced, the cycle gone
    assert observed["origins"] == [INSIDE] and observed["live"] == 0 and observed["active"] == 0
    assert len(observed["logs"]) == 1 and "mitm_disabled" in observed["logs"][0]


def test_quiet_looks_with_different_timeouts_each_end_at_their_own(tmp_path: Any) -> None:
    """Looks wait in `keepalive._LOOKS` in the order of their deadlines; one with a shorter
    idleTimeout than one waiting there is armed in its cycles' `Deadlines` instead: each ends (as
    `non_tls`, spliced) once nobody has spoken for its own idleTimeout."""

    async def run() -> tuple[Any, ...]:
        loop = asyncio.get_running_loop()
        slow = Proxy(Limits(idle_timeout=5.0, header_timeout=2.0), begin=True)
        fast = Proxy(Limits(idle_timeout=0.2, header_timeout=2.0), begin=True)
        for p in (slow, fast):
            p.ctx.tunnel_hook = _interceptor(p, True, tmp_path)
        with mock.patch.object(keepalive, "Connecting", lambda *a: ConnectingTo(slow, *a)):
            slow.start()
            slow.send(_connect_head("ok.test"))
            await slow.settle()
        t0 = loop.time()
        with mock.patch.object(keepalive, "Connecting", lambda *a: ConnectingTo(fast, *a)):
            fast.start()
            fast.send(_connect_head("ok.test"))
            await fast.settle()
            where = (len(keepalive._LOOKS.waiting), len(fast.ctx.deadlines), len(slow.ctx.deadlines))
            await fast.until(lambda: fast.client.detached, "the quiet tunnel spliced", 5.0)
        waited = loop.time() - t0
        still = (slow.client.detached, len(keepalive._LOOKS.waiting))
        for p in (fast, slow):
            await p.finish()
        return where, waited, still, _observed(fast), _observed(slow), len(keepalive._LOOKS.waiting)

    where, waited, still, fast, slow, left = asyncio.run(run())
    assert where == (1, 1, 0)  # the slow look in the looks' queue, the fast one in its cycles' deadlines
    assert 0.19 <= waited < 2.0
    assert still == (False, 1)  # the slow look waits on
    assert len(fast["logs"]) == 1 and "non_tls" in fast["logs"][0]
    assert len(slow["logs"]) == 1 and left == 0  # (its client's close ended it: nothing left waiting)


def test_a_quiet_new_tunnel_is_piped_after_the_idle_timeout_both_ways(tmp_path: Any) -> None:
    """Nobody speaks for idleTimeout: the look ends as the handler's `_peek` ends it (`non_tls`, then
    spliced: what comes later passes untouched), on the cycles' deadline timer."""

    async def run(begin: bool) -> tuple[Any, ...]:
        p = Proxy(Limits(idle_timeout=0.2, header_timeout=2.0), begin=begin)
        p.ctx.tunnel_hook = _interceptor(p, True, tmp_path)  # (interception on: a later request is not looked at)
        with (
            mock.patch.object(http_proxy, "connect", p.connect),
            mock.patch.object(keepalive, "Connecting", lambda *a: ConnectingTo(p, *a)),
        ):
            p.start()
            p.send(_connect_head("ok.test"))
            await p.settle()
            quiet = len(p.journal.records)
            await p.until(lambda: p.client.detached, "the quiet tunnel spliced", 5.0)
            p.send(INSIDE)
            await p.settle()
            await p.finish()
        return quiet, bytes(p.wire.out), _observed(p)

    new, old = asyncio.run(run(True)), asyncio.run(run(False))
    assert new == old
    quiet, out, observed = new
    assert quiet == 0 and out == b"HTTP/1.1 200 Connection established\r\n\r\n" + OK
    assert observed["transactions"] == [] and observed["origins"] == [INSIDE]  # piped, not intercepted
    assert len(observed["logs"]) == 1 and "non_tls" in observed["logs"][0]


def test_a_held_connect_waits_in_the_handler_then_tunnels(tmp_path: Any) -> None:
    async def run(begin: bool) -> tuple[Any, ...]:
        p = Proxy(begin=begin)
        p.ctx.tunnel_hook = _interceptor(p, False, tmp_path)
        with (
            mock.patch.object(http_proxy, "connect", p.connect),
            mock.patch.object(keepalive, "Connecting", lambda *a: ConnectingTo(p, *a)),
        ):
            p.gate.rules = RuleSet([r for r in RULES if r.id != 1])  # no rule decides ok.test now
            p.start()
            p.send(_connect_head("ok.test"))
            await p.settle()
            held = (p.gate.waiting(), p.client.task is not None, bytes(p.wire.out))
            p.gate.set_rules(RuleSet(list(RULES)), 2)  # allowed: released
            await p.settle()
            p.send(INSIDE)
            await p.settle()
            await p.finish()
        return held, bytes(p.wire.out), _observed(p)

    new, old = asyncio.run(run(True)), asyncio.run(run(False))
    assert new[0] == (1, True, b"")
    assert new[1] == b"HTTP/1.1 200 Connection established\r\n\r\n" + OK
    assert new[1:] == old[1:]


def test_claimed_names_and_caps_on_new_connects(tmp_path: Any) -> None:
    """A claimed name: verified once in the handler, then tunnels in the callbacks; a wrong secret
    refused by the handler (407). Past the caps: 429/503 from the handler. The same both ways."""
    conns = [
        [_connect_head("ok.test", _auth("claimed-agent", "s3cret")), INSIDE],
        [_connect_head("ok.test", _auth("claimed-agent", "s3cret")), INSIDE],
        [_connect_head("ok.test", _auth("claimed-agent", "wrong")), INSIDE],
        [_connect_head("ok.test"), INSIDE],
    ]
    new, old = tunnels_both_ways(conns, tmp_path, ids=True)
    assert _without_tasks(new) == _without_tasks(old)
    outs = [out for out, _t in new["clients"]]
    assert outs[0].endswith(OK) and outs[1].endswith(OK) and outs[3].endswith(OK)
    assert outs[2].startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
    assert [t for _o, t in new["clients"]] == [True, False, True, False]

    for limits, status in (
        (Limits(idle_timeout=2.0, header_timeout=2.0, max_per_client=0), b"429 Too Many Requests"),
        (Limits(idle_timeout=2.0, header_timeout=2.0, max_connections=0), b"503 Service Unavailable"),
    ):
        new, old = tunnels_both_ways([[_connect_head("ok.test"), INSIDE]], tmp_path, limits=limits)
        assert _without_tasks(new) == _without_tasks(old)
        assert new["clients"][0][0].startswith(b"HTTP/1.1 " + status)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(st.sampled_from(TUNNELS), min_size=1, max_size=4),
    st.sampled_from(["none", "off", "on"]),
)
def test_any_sequence_of_new_connects_gives_the_same_both_ways(
    tmp_path: Any, conns: list[list[bytes]], hook: str
) -> None:
    new, old = tunnels_both_ways(conns, tmp_path, hook)
    assert _without_tasks(new) == _without_tasks(old)


def test_a_repeated_connect_head_is_parsed_once_in_the_callbacks(tmp_path: Any) -> None:
    """The request cycle parses heads as the handler does (`parse_head`): a CONNECT head seen before
    is not parsed again."""
    from services.proxy import http1

    http_proxy._connect_heads.clear()
    seen: list[bytes] = []
    real = http1.parse_request_head

    def counting(buf: bytes, *a: Any) -> Any:
        seen.append(buf)
        return real(buf, *a)

    with mock.patch.object(http1, "parse_request_head", counting):
        new, _old = tunnels_both_ways([[_connect_head("ok.test"), INSIDE]] * 3, tmp_path)
    assert [out for out, _t in new["clients"]] == [b"HTTP/1.1 200 Connection established\r\n\r\n" + OK] * 3
    assert seen.count(_connect_head("ok.test")) == 1  # once for both runs (one cache), not per connection
