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
  that waits, a rule change closing the connection, the idle and answer deadlines (504).
"""

from __future__ import annotations

import asyncio
import base64
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from unittest import mock

import orjson
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
from services.proxy.pipeline import Recorder

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
]


class Proxy:
    """One client connection through the real handler, with scripted origins."""

    def __init__(self, limits: Limits | None = None, hooks: list[Any] | None = None) -> None:
        self.journal = Journal()
        self.gate = Gate(self.journal, Publisher(), {43051}, {"127.0.0.1"}, 5.0, 10)  # type: ignore[arg-type]
        self.gate.set_rules(RuleSet(list(RULES)), 1)
        self.ctx = ProxyContext(self.gate, limits or Limits(idle_timeout=2.0, header_timeout=2.0))
        self.ctx.recorder = Recorder(self.journal)  # type: ignore[arg-type]
        self.ctx.hooks = HookChain(hooks if hooks is not None else [RuleRecheck(self.gate)])
        self.origins: list[Wire] = []  # one per upstream connection, in the order opened
        self.client = ClientConn(self.ctx, http_proxy.handle_http)
        self.wire = Wire(self.client)

    async def connect(self, host: str, port: int, timeout: float, guard: Any) -> Conn:
        up = Conn()
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

    async def finish(self) -> None:
        if not self.client.closed:
            self.wire.close()
        await asyncio.wait_for(self.client.task, 5)  # type: ignore[arg-type]


def cycle_off() -> Any:
    """The cycle never serves: every request goes the handler's coroutine way (as before it)."""

    def serve(self: keepalive.KeptAlive, *_a: Any) -> asyncio.Future:
        self.clean = True  # the upstream stays as the handler had it
        fut = self.loop.create_future()
        fut.set_result(keepalive.Handover(keepalive.READ))
        return fut

    return mock.patch.object(keepalive.KeptAlive, "serve", serve)


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
                await asyncio.sleep(0.2)  # a claimed name's first check runs scrypt in a thread
                await p.settle()
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
                    await asyncio.sleep(0.2)
                    await p.settle()
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
