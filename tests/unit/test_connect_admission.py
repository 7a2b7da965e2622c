"""A CONNECT's admission, without sockets: the parsed-head cache (`http_proxy.parse_head`) and the
tunnel's deferred log entry (`Gate.finish_log`)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any
from unittest import mock

import pytest

from bus import records
from services.proxy import http1, http_proxy
from services.proxy.conn import PipeConn
from services.proxy.context import Limits
from services.proxy.http_proxy import parse_head
from harness.fakes import Journal, Publisher

CONNECT = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nUser-Agent: curl/8.5.0\r\n\r\n"


@pytest.fixture(autouse=True)
def fresh_cache() -> None:
    http_proxy._connect_heads.clear()


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The buffers the real parser was called for."""
    seen: list[bytes] = []
    real = http1.parse_request_head

    def counting(buf: bytes, *a: object, **k: object) -> object:
        seen.append(buf)
        return real(buf, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(http1, "parse_request_head", counting)
    return seen


def fields(head: http1.RequestHead) -> tuple:
    return (head.method, head.target, head.version, head.headers, head.host, head.port, head.keep_alive,
            head.proxy_user, head.proxy_password, head.authority, head.names)  # fmt: skip


def test_a_repeated_connect_head_is_parsed_once_and_reads_the_same(parses: list[bytes]) -> None:
    limits = Limits()
    first = parse_head(CONNECT, limits)
    again = parse_head(bytes(CONNECT), limits)
    assert parses == [CONNECT]
    assert first is not None and again is not None
    fresh = http1.parse_request_head(CONNECT, limits.max_header_bytes, limits.max_headers)
    assert fresh is not None
    assert again[1] == first[1] == fresh[1] == len(CONNECT)
    assert fields(again[0]) == fields(fresh[0])
    # Another destination is another head.
    other = CONNECT.replace(b"example.com", b"example.org")
    got = parse_head(other, limits)
    assert got is not None and got[0].host == "example.org"
    assert len(parses) == 3


@pytest.mark.parametrize(
    "buf",
    [
        # the password must not outlive its connection
        CONNECT[:-2] + b"Proxy-Authorization: Basic " + base64.b64encode(b"alice:s3cret") + b"\r\n\r\n",
        # bytes after the head (a client that does not wait for the 200): never the same twice
        CONNECT + b"\x16\x03\x01\x02\x00",
        # a long head (the cache is bounded in bytes too)
        CONNECT[:-2] + b"X-Pad: " + b"p" * 2048 + b"\r\n\r\n",
        # a plain request
        b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
        # incomplete
        CONNECT[:-2],
    ],
)
def test_what_is_not_kept(parses: list[bytes], buf: bytes) -> None:
    limits = Limits()
    assert parse_head(buf, limits) == parse_head(buf, limits)
    assert len(parses) == 2
    assert not http_proxy._connect_heads


def test_a_refused_head_is_refused_every_time(parses: list[bytes]) -> None:
    bad = b"CONNECT example.com:99999 HTTP/1.1\r\nHost: example.com\r\n\r\n"
    for _ in range(2):
        with pytest.raises(http1.HttpError, match="bad port"):
            parse_head(bad, Limits())
    assert len(parses) == 2 and not http_proxy._connect_heads


def test_the_limits_are_applied_to_a_kept_head() -> None:
    """A head kept under larger limits is still refused under smaller ones (config reload)."""
    assert parse_head(CONNECT, Limits()) is not None
    with pytest.raises(http1.HttpError) as exc:
        parse_head(CONNECT, Limits(max_headers=1))
    assert exc.value.status == 431
    with pytest.raises(http1.HttpError) as exc:
        parse_head(CONNECT, Limits(max_header_bytes=40))
    assert exc.value.status in (414, 431)


def test_the_cache_is_bounded() -> None:
    limits = Limits()
    for i in range(http_proxy.CONNECT_HEADS + 5):
        parse_head(b"CONNECT h%d.example:443 HTTP/1.1\r\nHost: h%d.example:443\r\n\r\n" % (i, i), limits)
        assert len(http_proxy._connect_heads) <= http_proxy.CONNECT_HEADS


# ---------------------------------------------------------------- the tunnel's deferred log entry


def test_a_deferred_tunnel_entry_is_written_once_with_its_skip_reason() -> None:
    """`Gate.finish_log` writes what `Gate.record` would have written at the decision, plus the
    mitm_skip_reason known only once the first bytes were seen; once."""
    from greyproxy.policy import RuleSet
    from greyproxy.policy.ruleset import Rule
    from services.proxy.gate import Gate

    async def main() -> None:
        g = Gate(Journal(), Publisher(), {1}, set(), 0.05, 10)  # type: ignore[arg-type]
        g.set_rules(RuleSet([Rule.from_dict({"id": 7, "container_pattern": "*", "destination_pattern": "*",
                                             "action": "allow"})]), 1)  # fmt: skip
        g.defer_tunnel_logs = True
        v = await g.admit("alice", "Example.COM", 443, "CONNECT")
        assert v.allowed and v.log_pending is not None and not g.journal.records  # type: ignore[attr-defined]
        g.finish_log(v, "mitm_disabled")
        g.finish_log(v, "non_tls")  # the second call writes nothing
        ((kind, data),) = g.journal.records  # type: ignore[attr-defined]
        got = records.log_fields(data)
        assert kind == "log"
        assert (got["container_name"], got["destination_host"], got["destination_port"], got["method"]) == (
            "alice", "example.com", 443, "CONNECT"
        )  # fmt: skip
        assert (got["result"], got["rule_id"], got["reason"], got["mitm_skip_reason"]) == (
            "allowed", 7, "rule", "mitm_disabled"
        )  # fmt: skip
        # the same values as the entry written at once (interception off)
        g.defer_tunnel_logs = False
        v2 = await g.admit("alice", "Example.COM", 443, "CONNECT")
        g.finish_log(v2)
        now = records.log_fields(g.journal.records[1][1])  # type: ignore[attr-defined]
        for field in ("container_name", "destination_host", "destination_port", "method", "result", "rule_id",
                      "reason", "rule_summary", "container_id", "resolved_hostname"):  # fmt: skip
            assert got[field] == now[field], field
        assert now["mitm_skip_reason"] is None

    asyncio.run(main())


# ---------------------------------------------------------------- the connect driven from callbacks


def _connecting(host: str, port: int, timeout: float = 2.0, guard: Any = None) -> Any:
    """(`upstream.Connecting`'s outcome, or 'lookup' when it did not start; `upstream.connect`'s)."""
    from services.proxy import upstream

    async def main() -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        g = guard or (lambda ip, port: None)
        c = upstream.Connecting(host, port, timeout, g, lambda conn, failure: fut.set_result((conn, failure)), loop)
        if not c.start():
            got: Any = "lookup"
        else:
            conn, failure = await fut
            got = ("conn", type(conn).__name__) if conn is not None else (failure and (failure.kind, str(failure)))
            # the connection given is the one connected (the factory's, `Connecting.conn`), not kept after
            assert conn is None or conn.transport.get_protocol() is conn
            assert c.conn is None
            if conn is not None:
                # given at its `connection_made`: the connecting coroutine is run to its end at the
                # connection's next callback (its close here), which unlinks the two
                assert c.made and conn.connecting is c
                conn.close()
                await asyncio.wait_for(conn.wait_closed(), 5)
                assert conn.connecting is None
            assert c.coro is None and c.fut is None
        try:
            conn = await upstream.connect(host, port, timeout, g, protocol=PipeConn)  # (a tunnel's, as Connecting's)
            want: Any = ("conn", type(conn).__name__)
            conn.close()
        except upstream.UpstreamFailure as exc:
            want = (exc.kind, str(exc))
        return got, want

    return main


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_the_connect_from_callbacks_answers_as_connect(loop_kind: str) -> None:
    import uvloop

    from services.proxy import upstream

    run = asyncio.run if loop_kind == "asyncio" else uvloop.run

    async def listening() -> tuple[Any, Any]:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await _connecting("127.0.0.1", port)()
        finally:
            server.close()

    got, want = run(listening())
    assert got == want == ("conn", "PipeConn")
    closed = _free_port()
    got, want = run(_connecting("127.0.0.1", closed)())
    assert got == want == ("refused", f"connection to 127.0.0.1:{closed} refused")
    got, want = run(_connecting("127.0.0.1", closed, guard=lambda ip, port: "is denied by rule 3")())
    assert got == want == ("guard", f"127.0.0.1:{closed} is denied by rule 3")
    assert run(_connecting("not-cached.invalid", 443)())[0] == "lookup"

    # a connect that never completes: the deadline, the same failure
    async def never(self: Any, *_a: Any, **_k: Any) -> Any:
        await asyncio.get_running_loop().create_future()

    loop_cls = type(asyncio.new_event_loop()) if loop_kind == "asyncio" else uvloop.Loop
    with mock.patch.object(loop_cls, "create_connection", never):
        got, want = run(_connecting("127.0.0.1", closed, timeout=0.05)())
    assert got == want == ("timeout", f"connecting to 127.0.0.1:{closed} timed out")

    # a cached name: the next address after a refusal; all refused: the name is looked up again
    async def cached() -> Any:
        loop = asyncio.get_running_loop()
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        out = []
        try:
            for addrs in ([("127.0.0.2", closed), ("127.0.0.1", port)], [("127.0.0.1", closed), ("127.0.0.2", closed)]):
                upstream._addresses[("cached.test", port)] = (addrs, loop.time() + 10)
                fut = loop.create_future()
                c = upstream.Connecting(
                    "cached.test", port, 2.0, lambda ip, port: None, lambda *r, f=fut: f.set_result(r), loop
                )
                assert c.start()
                conn, failure = await fut
                out.append((type(conn).__name__, failure, ("cached.test", port) in upstream._addresses))
                if conn is not None:
                    conn.close()
        finally:
            server.close()
            upstream._addresses.clear()
        return out

    assert run(cached()) == [("PipeConn", None, True), ("NoneType", None, False)]


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_connect_driven_by_hand_from_a_callback_has_its_deadline(loop_kind: str) -> None:
    """`upstream.connect` reached by a step driven from a connection's callbacks (an intercepted
    tunnel's request past its first wait, keepalive.py): no current task. It connects, and its
    deadline still holds (it raised AssertionError before: its deadline cancels a task)."""
    import uvloop

    from services.proxy import upstream

    run = asyncio.run if loop_kind == "asyncio" else uvloop.run

    async def by_hand(host: str, port: int, timeout: float) -> Any:
        """Drive `connect` from loop callbacks, as keepalive.KeptAlive._run_tunnel does; its outcome."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        coro = upstream.connect(host, port, timeout, lambda ip, port: None)

        def step(_fut: Any = None) -> None:
            assert asyncio.current_task(loop) is None
            try:
                waiting = coro.send(None)
            except StopIteration as stop:
                done.set_result(("conn", type(stop.value).__name__))
                stop.value.close()
            except upstream.UpstreamFailure as exc:
                done.set_result((exc.kind, str(exc)))
            except BaseException as exc:  # noqa: BLE001 - what the test looks for
                done.set_result(("raised", type(exc).__name__))
            else:
                waiting._asyncio_future_blocking = False
                waiting.add_done_callback(step)

        loop.call_soon(step)
        return await asyncio.wait_for(done, 5)

    async def listening() -> Any:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        try:
            return await by_hand("127.0.0.1", server.sockets[0].getsockname()[1], 2.0)
        finally:
            server.close()

    assert run(listening()) == ("conn", "Conn")
    closed = _free_port()
    assert run(by_hand("127.0.0.1", closed, 2.0)) == ("refused", f"connection to 127.0.0.1:{closed} refused")

    async def never(self: Any, *_a: Any, **_k: Any) -> Any:
        await asyncio.get_running_loop().create_future()

    loop_cls = type(asyncio.new_event_loop()) if loop_kind == "asyncio" else uvloop.Loop
    with mock.patch.object(loop_cls, "create_connection", never):
        got = run(by_hand("127.0.0.1", closed, 0.05))
    assert got == ("timeout", f"connecting to 127.0.0.1:{closed} timed out")


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_connect_goes_on_at_connection_made_and_its_coroutine_ends_later(loop_kind: str) -> None:
    """`Connecting` calls `done` from the connection's `connection_made` (`_made`: no callback of the
    transport's waiter, no loop turn for it); the connecting coroutine, which still waits for that
    waiter, is run to its end at the connection's next callback (here its first bytes), and the
    connection it gave goes on working after that (the coroutine's end does not close it), with
    nothing reported to the loop's exception handler."""
    import uvloop

    from services.proxy import upstream

    run = asyncio.run if loop_kind == "asyncio" else uvloop.run

    async def main() -> tuple[Any, ...]:
        loop = asyncio.get_running_loop()
        errors: list = []
        loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(100):
                writer.write(data)
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        given: list = []
        c = upstream.Connecting("127.0.0.1", port, 5.0, lambda ip, p: None, lambda *r: given.append(r), loop)
        assert c.start()
        while not given:
            await asyncio.sleep(0.001)
        conn, failure = given[0]
        at_done = (failure, c.made, conn.connecting is c, c.coro is not None, c in upstream._DEADLINES.waiting)
        replies = []
        for data in (b"ping", b"pong"):
            conn.write(data)
            while not conn.buf:
                await asyncio.wait_for(conn.read_more(), 5)
            replies.append(conn.take())
        after = (conn.connecting, c.coro, c.fut, conn.closed, conn.transport.is_closing())
        conn.close()
        await asyncio.wait_for(conn.wait_closed(), 5)
        server.close()
        await asyncio.sleep(0.01)
        return at_done, replies, after, errors

    at_done, replies, after, errors = run(main())
    assert at_done == (None, True, True, True, False)  # given at connection_made, the coroutine still to end
    assert replies == [b"ping", b"pong"]
    assert after == (None, None, None, False, False)  # ended at the first bytes; the connection open
    assert errors == []


# ---------------------------------------------------------------- the connects' shared deadline timer


def _hanging(loop_kind: str) -> Any:
    """(run, the loop class, a `create_connection` that never completes) for `loop_kind`."""
    import uvloop

    async def never(self: Any, *_a: Any, **_k: Any) -> Any:
        await asyncio.get_running_loop().create_future()

    run = asyncio.run if loop_kind == "asyncio" else uvloop.run
    loop_cls = type(asyncio.new_event_loop()) if loop_kind == "asyncio" else uvloop.Loop
    return run, loop_cls, never


def _start_hanging(port: int, timeout: float, out: list) -> Any:
    """A `Connecting` to a connect that never completes; appends (failure kind, seconds waited)."""
    from services.proxy import upstream

    loop = asyncio.get_running_loop()
    t0 = loop.time()

    def done(conn: Any, failure: Any) -> None:
        out.append((failure.kind if failure is not None else conn, loop.time() - t0))

    c = upstream.Connecting("127.0.0.1", port, timeout, lambda ip, p: None, done, loop)
    assert c.start()
    return c


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_connects_in_flight_share_one_deadline_timer(loop_kind: str) -> None:
    """Connects started together wait on one timer and each fails at its own deadline ('timeout',
    not before); a shorter timeout than those waiting is not held up by them; a connect that ends
    leaves the queue."""
    from services.proxy import upstream

    run, loop_cls, never = _hanging(loop_kind)
    port = _free_port()
    armed: list[float] = []
    real_call_at, real_call_later = loop_cls.call_at, loop_cls.call_later

    def counting(self: Any, when: float, cb: Any, *args: Any, **kw: Any) -> Any:
        if getattr(cb, "__name__", "") in ("_fire", "_expire"):  # the connects' (not the sleeps')
            armed.append(when)
        return real_call_at(self, when, cb, *args, **kw)

    def counting_later(self: Any, delay: float, cb: Any, *args: Any, **kw: Any) -> Any:
        # (asyncio's call_later calls its call_at, uvloop's does not)
        if getattr(cb, "__name__", "") in ("_fire", "_expire") and loop_kind == "uvloop":
            armed.append(delay)
        return real_call_later(self, delay, cb, *args, **kw)

    async def main() -> tuple[list, list]:
        loop = asyncio.get_running_loop()
        many: list = []
        for _ in range(20):
            _start_hanging(port, 0.2, many)
        assert len(upstream._DEADLINES.waiting) == 20
        short: list = []
        await asyncio.sleep(0.02)
        _start_hanging(port, 0.05, short)  # out of order: a timer of its own
        t0 = loop.time()
        while len(many) < 20 and loop.time() - t0 < 3:
            await asyncio.sleep(0.01)
        return many, short

    with (
        mock.patch.object(loop_cls, "create_connection", never),
        mock.patch.object(loop_cls, "call_at", counting),
        mock.patch.object(loop_cls, "call_later", counting_later),
    ):
        many, short = run(main())
    assert [kind for kind, _ in many] == ["timeout"] * 20
    assert all(0.195 <= waited < 1.0 for _, waited in many), many
    assert short and short[0][0] == "timeout" and 0.045 <= short[0][1] < 0.15, short
    # one for the twenty (the loop's clock lags: maybe a re-arm or two), one for the short
    assert 2 <= len(armed) <= 5, armed
    assert not upstream._DEADLINES.waiting

    # a connect that succeeds leaves the queue at once
    async def succeeds() -> Any:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        out: list = []
        try:
            c = _start_hanging(server.sockets[0].getsockname()[1], 5.0, out)
            assert c in upstream._DEADLINES.waiting
            while not out:
                await asyncio.sleep(0.005)
            conn = out[0][0]
            conn.close()
            return conn, c in upstream._DEADLINES.waiting
        finally:
            server.close()

    conn, queued = run(succeeds())
    assert type(conn).__name__ == "PipeConn" and queued is False


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_closed_loops_connects_do_not_stay_queued(loop_kind: str) -> None:
    """A connect still in flight when its event loop closes is dropped from the shared queue when the
    next loop connects, and the next loop's connects get their deadline."""
    from services.proxy import upstream

    run, loop_cls, never = _hanging(loop_kind)
    port = _free_port()

    async def left_behind() -> Any:
        return _start_hanging(port, 30.0, [])

    async def next_loop() -> tuple[bool, list]:
        out: list = []
        c = _start_hanging(port, 0.05, out)
        stale_gone = len(upstream._DEADLINES.waiting) == 1 and c in upstream._DEADLINES.waiting
        await asyncio.sleep(0.3)
        return stale_gone, out

    with mock.patch.object(loop_cls, "create_connection", never):
        old = run(left_behind())
        assert old in upstream._DEADLINES.waiting  # its loop is closed: nothing will end it
        stale_gone, out = run(next_loop())
    assert stale_gone
    assert out and out[0][0] == "timeout" and 0.045 <= out[0][1] < 0.25, out
    assert not upstream._DEADLINES.waiting


def test_connects_on_two_live_loops_each_get_their_deadline() -> None:
    """Two event loops at once (threads): the second loop's connects, while the first loop's are
    queued, arm timers of their own; both end at their deadlines."""
    import threading

    run, loop_cls, never = _hanging("asyncio")
    port = _free_port()
    first: list = []
    queued = threading.Event()

    async def a() -> None:
        _start_hanging(port, 0.4, first)
        queued.set()
        await asyncio.sleep(0.8)

    async def b() -> list:
        out: list = []
        _start_hanging(port, 0.05, out)
        await asyncio.sleep(0.3)
        return out

    with mock.patch.object(loop_cls, "create_connection", never):
        t = threading.Thread(target=run, args=(a(),))
        t.start()
        assert queued.wait(5)
        second = run(b())
        t.join(5)
    assert second and second[0][0] == "timeout" and 0.045 <= second[0][1] < 0.25, second
    assert first and first[0][0] == "timeout" and 0.395 <= first[0][1] < 0.7, first


def test_new_admission_is_the_admission_made_by_its_init() -> None:
    """`gate.new_admission` (a new tunnel's, without __init__'s call) and `Gate.track`'s LiveConn (made
    the same way) have every field an `Admission(...)` / `LiveConn(...)` has."""
    from services.proxy.gate import Admission, Gate, LiveConn, Verdict, new_admission

    g = Gate(Journal(), Publisher(), {1}, set(), 0.05, 10)  # type: ignore[arg-type]
    v = Verdict(True, "rule", 3, "name.test")
    made, want = (
        new_admission(g, "alice", "h.test", 443, "CONNECT", v),
        Admission(g, "alice", "h.test", 443, "CONNECT", v),
    )
    fields = ("gate", "container", "host", "port", "method", "verdict")
    assert [getattr(made, f) for f in fields] == [getattr(want, f) for f in fields]

    def close() -> None:
        pass

    cid = g.track("alice", "H.Test", 443, v, close)
    lc = g.live[cid]
    fields = ("container", "host", "port", "resolved", "rule_id", "close")
    assert type(lc) is LiveConn
    assert [getattr(lc, f) for f in fields] == ["alice", "h.test", 443, "name.test", 3, close]
