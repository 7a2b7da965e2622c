"""The per-tunnel plumbing, without the stack: the first-bytes wait runs in the handler's own task
(no task per tunnel), and a closed tunnel's pair of connections is freed by reference counting
(no reference cycle left for the garbage collector; the proxy raises its collection threshold on
that basis, greyproxy/runtime.py `tune_gc`).
"""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.proxy.conn import Conn, splice, wait_either


class FakeTransport:
    def __init__(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return False


def make_conn() -> Conn:
    c = Conn()
    c.connection_made(FakeTransport())  # type: ignore[arg-type]
    return c


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ---------------------------------------------------------------- wait_either


@pytest.mark.parametrize("side", ["a", "b"])
def test_wait_either_wakes_on_bytes_from_either_side(side: str) -> None:
    async def main() -> None:
        a, b = make_conn(), make_conn()
        asyncio.get_running_loop().call_later(0.02, (a if side == "a" else b).data_received, b"x")
        assert await wait_either(a, b, 5.0) is True
        assert (a if side == "a" else b).buf == b"x"
        assert a._waiter is None and b._waiter is None  # nothing left behind for a later reader

    run(main())


@pytest.mark.parametrize("event", ["eof", "lost"])
def test_wait_either_wakes_on_eof_and_close(event: str) -> None:
    async def main() -> None:
        a, b = make_conn(), make_conn()
        loop = asyncio.get_running_loop()
        if event == "eof":
            loop.call_later(0.02, b.eof_received)
        else:
            loop.call_later(0.02, a.connection_lost, None)
        assert await wait_either(a, b, 5.0) is True
        # Already at EOF: at once, without waiting for the timeout.
        t0 = loop.time()
        assert await wait_either(a, b, 5.0) is True
        assert loop.time() - t0 < 0.5

    run(main())


def test_wait_either_times_out_and_cleans_up() -> None:
    async def main() -> None:
        a, b = make_conn(), make_conn()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await wait_either(a, b, 0.1) is False
        assert 0.09 <= loop.time() - t0 < 1.0
        assert a._waiter is None and b._waiter is None
        # A normal read afterwards still gets its bytes.
        loop.call_later(0.01, a.data_received, b"later")
        assert await a.read_more(1.0) is True

    run(main())


def test_wait_either_starts_no_task() -> None:
    async def main() -> None:
        a, b = make_conn(), make_conn()
        before = len(asyncio.all_tasks())
        seen: list[int] = []

        def look() -> None:
            seen.append(len(asyncio.all_tasks()))
            a.data_received(b"\x16\x03")

        asyncio.get_running_loop().call_later(0.05, look)
        assert await wait_either(a, b, 5.0) is True
        assert seen == [before]  # while it waited: only this test's own task

    run(main())


def test_wait_either_is_bounded_by_the_connections_read_timer() -> None:
    """No timer of its own: `a`'s read timer, already armed by an earlier read for a nearer deadline
    (as read_head's header deadline is), bounds the wait too; a nearer deadline moves it earlier."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        a, b = make_conn(), make_conn()
        loop.call_later(0.01, a.data_received, b"CONNECT")
        assert await a.read_more(30.0) is True  # arms a's timer for 30 s from now
        armed = a._timer
        assert armed is not None
        timers: list[Any] = []
        real_call_at, real_call_later = loop.call_at, loop.call_later
        loop.call_at = lambda *args, **kw: timers.append(args) or real_call_at(*args, **kw)  # type: ignore[method-assign]
        loop.call_later = lambda *args, **kw: timers.append(args) or real_call_later(*args, **kw)  # type: ignore[method-assign]
        loop.call_soon(b.data_received, b"x")
        assert await wait_either(a, b, 600.0) is True
        assert timers == [] and a._timer is armed  # the 30 s timer covers a 600 s wait
        assert a._timed is None and a._deadline is None  # nothing left for that timer to time out
        # A deadline nearer than the armed timer re-arms it: the wait still ends on time.
        t0 = loop.time()
        assert await wait_either(a, b, 0.1) is False
        assert 0.09 <= loop.time() - t0 < 1.0 and len(timers) == 1
        # Later reads still time out by their own deadlines.
        with pytest.raises(TimeoutError):
            await a.read_more(0.05)

    run(main())


def test_wait_either_resumes_a_paused_reader() -> None:
    async def main() -> None:
        a, b = make_conn(), make_conn()
        a._reading_paused = True
        a.transport.paused = True  # type: ignore[union-attr]
        asyncio.get_running_loop().call_later(0.01, a.data_received, b"x")
        assert await wait_either(a, b, 1.0) is True
        assert a.transport.paused is False  # type: ignore[union-attr]

    run(main())


def test_wait_either_cancelled_leaves_no_waiter() -> None:
    async def main() -> None:
        a, b = make_conn(), make_conn()
        t = asyncio.ensure_future(wait_either(a, b, 5.0))
        await asyncio.sleep(0.01)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert a._waiter is None and b._waiter is None

    run(main())


# ---------------------------------------------------------------- no reference cycles


@pytest.fixture
def saved_garbage() -> Iterator[None]:
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


async def _pair(loop: asyncio.AbstractEventLoop) -> tuple[Conn, socket.socket]:
    """A Conn on one end of a real socket pair; the other end, a non-blocking socket."""
    s1, s2 = socket.socketpair()
    s2.setblocking(False)
    _t, conn = await loop.create_connection(Conn, sock=s1)
    return conn, s2


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("first", ["client", "upstream"])
def test_a_closed_tunnel_leaves_no_cyclic_garbage(saved_garbage: None, first: str, loop_kind: str) -> None:
    async def main() -> int:
        loop = asyncio.get_running_loop()
        client, client_peer = await _pair(loop)
        upstream, upstream_peer = await _pair(loop)
        splice(client, upstream)
        await loop.sock_sendall(client_peer, b"hello")
        assert await asyncio.wait_for(loop.sock_recv(upstream_peer, 100), 5) == b"hello"
        one, other = (client_peer, upstream_peer) if first == "client" else (upstream_peer, client_peer)
        one.close()  # one side hangs up (its FIN is passed on), then the other
        assert await asyncio.wait_for(loop.sock_recv(other, 100), 5) == b""
        other.close()
        await asyncio.wait_for(client.wait_closed(), 5)  # the tunnel closes both
        await asyncio.wait_for(upstream.wait_closed(), 5)
        del client, upstream
        await asyncio.sleep(0.05)
        gc.collect()
        return sum(isinstance(o, Conn) for o in gc.garbage)

    if loop_kind == "uvloop":  # what the proxy runs on
        uvloop = pytest.importorskip("uvloop")
        assert uvloop.run(main()) == 0
    else:
        assert run(main()) == 0


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_the_descriptor_for_direct_writes_is_looked_up_only_for_large_chunks(loop_kind: str) -> None:
    """A tunnel that passes only small chunks never builds the socket object (get_extra_info("socket")
    costs an object and a getsockname() call per connection); a large chunk goes to the socket directly."""
    from services.proxy.conn import DIRECT_WRITE_MIN, FD_UNKNOWN

    async def main() -> None:
        loop = asyncio.get_running_loop()
        client, client_peer = await _pair(loop)
        upstream, upstream_peer = await _pair(loop)
        splice(client, upstream)
        assert client._fd == upstream._fd == FD_UNKNOWN
        await loop.sock_sendall(client_peer, b"small")
        assert await asyncio.wait_for(loop.sock_recv(upstream_peer, 100), 5) == b"small"
        assert upstream._fd == FD_UNKNOWN  # written through the transport: no lookup
        big = bytes(range(256)) * (4 * DIRECT_WRITE_MIN // 256)
        await loop.sock_sendall(client_peer, big)
        got = b""
        while len(got) < len(big):
            chunk = await asyncio.wait_for(loop.sock_recv(upstream_peer, 1 << 20), 5)
            assert chunk
            got += chunk
        assert got == big
        assert upstream._fd == upstream.transport.get_extra_info("socket").fileno()  # type: ignore[union-attr]
        assert client._fd == FD_UNKNOWN  # nothing large went the other way
        client_peer.close()
        upstream_peer.close()
        await asyncio.wait_for(client.wait_closed(), 5)
        await asyncio.wait_for(upstream.wait_closed(), 5)

    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        uvloop.run(main())
    else:
        run(main())


# ---------------------------------------------------------------- upstream addresses, cached briefly


class FakeResolver:
    """Stands in for the loop's getaddrinfo: counts lookups, answers from a table that can change."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls = 0

    async def __call__(self, host: str, port: int, **kw: Any) -> list[tuple]:
        self.calls += 1
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in self.answers[host]]


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeResolver]:
    from services.proxy import upstream

    upstream._addresses.clear()
    fake = FakeResolver({"svc.test": ["127.0.0.1"]})
    real_get_loop = asyncio.get_running_loop

    def patched() -> asyncio.AbstractEventLoop:
        loop = real_get_loop()
        loop.getaddrinfo = fake  # type: ignore[method-assign]
        return loop

    monkeypatch.setattr(upstream.asyncio, "get_running_loop", patched)
    yield fake
    upstream._addresses.clear()


def _is_ip(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except (OSError, ValueError):
            pass
    return False


@given(
    st.one_of(
        st.text(max_size=40),
        st.ip_addresses().map(str),
        st.from_regex(r"[0-9a-f:.]{1,20}", fullmatch=True),
        # dotted quads and near ones (leading zeros, octets past 255, too few or many, a stray byte)
        st.lists(
            st.sampled_from(["0", "00", "01", "9", "10", "99", "100", "249", "255", "256", "999"]),
            min_size=3,
            max_size=5,
        ).map(".".join),
        st.from_regex(r"[0-9.]{1,17}[\x00 x\u0663]?", fullmatch=True),
    )
)
@settings(max_examples=300, deadline=None)
def test_an_ip_literal_is_told_from_a_name_without_a_lookup(host: str) -> None:
    """`upstream._literal` (a name is told at once by its last character, without inet_pton's
    exceptions) agrees with inet_pton on anything."""
    from services.proxy.upstream import _literal

    assert _literal(host, 443) == ([(host, 443)] if _is_ip(host) else None)
    for name in (
        "ok.test",
        "host1",
        "1.2.3.4.",
        "::1",
        "127.0.0.1",
        "",
        "fe80::1%eth0",
        "1.2.3",
        "01.2.3.4",
        "0.0.0.0",
        "1.2.3.255",
    ):
        assert _literal(name, 80) == ([(name, 80)] if _is_ip(name) else None)


def test_a_names_addresses_are_looked_up_once_for_a_while(resolver: FakeResolver) -> None:
    from services.proxy import upstream

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(5):
            assert await upstream._resolve(loop, "svc.test", 443, 5.0) == [("127.0.0.1", 443)]
        assert resolver.calls == 1
        assert await upstream._resolve(loop, "svc.test", 80, 5.0) == [("127.0.0.1", 80)]  # per port
        assert resolver.calls == 2
        # An IP literal is never looked up nor kept.
        assert await upstream._resolve(loop, "10.1.2.3", 443, 5.0) == [("10.1.2.3", 443)]
        assert resolver.calls == 2 and ("10.1.2.3", 443) not in upstream._addresses
        # Once the entry is old, the next connection looks the name up again.
        addrs, _exp = upstream._addresses[("svc.test", 443)]
        upstream._addresses[("svc.test", 443)] = (addrs, loop.time() - 0.001)
        resolver.answers["svc.test"] = ["127.0.0.2"]
        assert await upstream._resolve(loop, "svc.test", 443, 5.0) == [("127.0.0.2", 443)]
        assert resolver.calls == 3

    run(main())


def test_a_failed_lookup_is_not_kept(resolver: FakeResolver) -> None:
    from services.proxy import upstream

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(2):
            with pytest.raises(upstream.UpstreamFailure) as exc:
                await upstream._resolve(loop, "nowhere.test", 443, 5.0)
            assert exc.value.kind == "dns"
        assert resolver.calls == 2

    run(main())


def test_a_moved_name_is_looked_up_again_when_its_cached_address_fails(resolver: FakeResolver) -> None:
    from services.proxy import upstream

    async def main() -> None:
        srv = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        dead_port = dead.getsockname()[1]
        dead.close()  # nothing listens there: refused
        try:
            resolver.answers["svc.test"] = ["127.0.0.1"]
            conn = await upstream.connect("svc.test", port, 5.0, lambda ip, p: None)
            conn.abort()
            assert resolver.calls == 1
            # The name "moves": what is cached now refuses (simulated by pointing the cache at a dead port).
            addrs, exp = upstream._addresses[("svc.test", port)]
            upstream._addresses[("svc.test", port)] = ([("127.0.0.1", dead_port)], exp)
            conn = await upstream.connect("svc.test", port, 5.0, lambda ip, p: None)
            conn.abort()
            assert resolver.calls == 2  # looked up again, and connected to the fresh address
            # A name that is not cached and refuses is not looked up twice.
            upstream._addresses.clear()
            with pytest.raises(upstream.UpstreamFailure) as exc:
                await upstream.connect("svc.test", dead_port, 5.0, lambda ip, p: None)
            assert exc.value.kind == "refused" and resolver.calls == 3
        finally:
            srv.close()

    run(main())


# ---------------------------------------------------------------- the connect deadline


@pytest.fixture
def hanging_connect() -> Iterator[None]:
    """Every connect hangs (as one to an address that drops SYNs does)."""
    real = asyncio.BaseEventLoop.create_connection

    async def hang(self: Any, *args: Any, **kw: Any) -> Any:
        await asyncio.sleep(3600)

    asyncio.BaseEventLoop.create_connection = hang  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        asyncio.BaseEventLoop.create_connection = real  # type: ignore[method-assign]


def test_a_connect_past_its_deadline_is_a_timeout_and_the_task_goes_on(hanging_connect: None) -> None:
    from services.proxy import upstream

    async def main() -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(upstream.UpstreamFailure) as exc:
            await upstream.connect("127.0.0.1", 9, 0.2, lambda ip, p: None)
        assert exc.value.kind == "timeout" and exc.value.http_answer()[0] == 504
        assert 0.15 <= loop.time() - t0 < 2.0
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0  # the deadline's cancel is consumed
        await asyncio.sleep(0.01)  # and the task is not cancelled later

    run(main())


def test_a_connect_cancelled_from_outside_stays_cancelled(hanging_connect: None) -> None:
    from services.proxy import upstream

    async def main() -> None:
        task = asyncio.ensure_future(upstream.connect("127.0.0.1", 9, 5.0, lambda ip, p: None))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())


# ---------------------------------------------------------------- the first-bytes look while nobody speaks


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_quiet_looks_end_at_their_own_deadlines_on_one_timer(loop_kind: str) -> None:
    """Looks where nobody speaks each end (False) once they waited their timeout, on one timer for
    them all and none on the connections; a look that gets bytes ends at once and leaves nothing."""
    from services.proxy.mitm import QuietLooks

    async def main() -> None:
        loop = asyncio.get_running_loop()
        looks = QuietLooks()

        async def one(delay: float, timeout: float) -> tuple[bool, float, Conn]:
            await asyncio.sleep(delay)
            a, b = make_conn(), make_conn()
            t0 = loop.time()
            got = await looks.wait(a, b, timeout, loop)
            return got, loop.time() - t0, a

        # three silent looks starting 50 ms apart, and one that gets a byte
        async def spoken() -> tuple[bool, float, Conn]:
            a, b = make_conn(), make_conn()
            loop.call_later(0.03, a.data_received, b"\x16\x03")
            t0 = loop.time()
            return await looks.wait(a, b, 0.3, loop), loop.time() - t0, a

        results = await asyncio.wait_for(asyncio.gather(one(0, 0.3), one(0.05, 0.3), one(0.1, 0.3), spoken()), 5)
        for got, took, a in results[:3]:
            assert got is False
            assert 0.295 <= took < 0.3 + 0.25, took  # at its own deadline (the clock has ms steps)
            assert a._timer is None and a._waiter is None  # no timer of its own, nothing left behind
        got, took, a = results[3]
        assert got is True and took < 0.25 and a.buf == b"\x16\x03" and a._timer is None
        assert len(looks) == 0

    if loop_kind == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        run(main())


def test_quiet_looks_arm_one_timer_for_many_looks() -> None:
    from services.proxy.mitm import QuietLooks

    async def main() -> None:
        loop = asyncio.get_running_loop()
        looks = QuietLooks()
        armed: list[Any] = []
        real_call_at = loop.call_at

        def call_at(when: float, cb: Any, *args: Any, **kw: Any) -> Any:
            if cb == looks._fire:
                armed.append(when)
            return real_call_at(when, cb, *args, **kw)

        loop.call_at = call_at  # type: ignore[method-assign]
        pairs = [(make_conn(), make_conn()) for _ in range(20)]
        waits = [asyncio.ensure_future(looks.wait(a, b, 30.0, loop)) for a, b in pairs]
        await asyncio.sleep(0.01)
        assert len(looks) == 20 and len(armed) == 1
        for a, _b in pairs:
            a.data_received(b"GET / HTTP/1.1\r\n")
        assert await asyncio.gather(*waits) == [True] * 20
        assert len(looks) == 0 and len(armed) == 1
        # a shorter timeout than the ones waiting: still ends on time (a timer of its own)
        a, b = make_conn(), make_conn()
        long = asyncio.ensure_future(looks.wait(make_conn(), make_conn(), 30.0, loop))
        await asyncio.sleep(0)
        t0 = loop.time()
        assert await asyncio.wait_for(looks.wait(a, b, 0.05, loop), 5) is False
        assert 0.045 <= loop.time() - t0 < 1.0
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long
        assert len(looks) == 0  # a cancelled look leaves nothing behind

    run(main())


def test_quiet_looks_follow_a_new_event_loop() -> None:
    """An interceptor outlives an event loop in tests (and a restarted loop): a timer left on the
    old loop never fires, so the looks on a new loop arm their own."""
    from services.proxy.mitm import QuietLooks

    looks = QuietLooks()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await asyncio.wait_for(looks.wait(make_conn(), make_conn(), 0.05, loop), 5) is False
        assert 0.045 <= loop.time() - t0 < 1.0

    async def leave_one() -> None:
        loop = asyncio.get_running_loop()
        t = asyncio.ensure_future(looks.wait(make_conn(), make_conn(), 30.0, loop))
        await asyncio.sleep(0.01)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t

    run(leave_one())  # its timer stays armed on a loop that is then closed
    run(main())


def test_a_look_where_nobody_speaks_is_other_after_the_idle_timeout() -> None:
    """The interceptor's look at a tunnel's first bytes (`_peek`): nobody speaking for idleTimeout is
    'other' (the tunnel is then piped and swept), on the looks' shared timer."""
    from services.proxy.context import Limits
    from services.proxy.mitm import Interceptor, QuietLooks

    hook = Interceptor.__new__(Interceptor)  # (only the look: no gate, recorder or certificates)
    hook._quiet = QuietLooks()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        a, b = make_conn(), make_conn()
        t0 = loop.time()
        got = await asyncio.wait_for(hook._peek(a, b, Limits(idle_timeout=0.1, header_timeout=5.0)), 5)
        assert got == ("other", None)
        assert 0.095 <= loop.time() - t0 < 1.0
        assert a._timer is None and len(hook._quiet) == 0
        # a client that speaks (a request line) is seen at once
        a, b = make_conn(), make_conn()
        loop.call_later(0.02, a.data_received, b"GET / HTTP/1.1\r\n")
        assert await asyncio.wait_for(hook._peek(a, b, Limits(idle_timeout=30.0)), 5) == ("http", None)

    run(main())


def test_bytes_received_are_counted_by_side_on_every_read() -> None:
    """GET /metrics' greyproxy_proxy_bytes_relayed: every read counts at once, by the side it came from
    (a client connection, `Conn.client_side`, or an upstream one), buffered or piped."""
    from services.proxy.conn import RECEIVED
    from services.proxy.context import ClientConn, Limits, ProxyContext

    class Sink(FakeTransport):
        def __init__(self) -> None:
            super().__init__()
            self.out = b""

        def write(self, data: bytes) -> None:
            self.out += data

        def get_write_buffer_size(self) -> int:
            return 0

    before = RECEIVED.snapshot()
    client = ClientConn(ProxyContext(None, Limits()), None)  # type: ignore[arg-type]
    client.transport = sink = Sink()  # type: ignore[assignment]  # (no handler started)
    up = make_conn()
    client.data_received(b"12345")  # buffered (a head being read)
    up.data_received(b"ab")
    assert RECEIVED.snapshot() == {"client": before["client"] + 5, "upstream": before["upstream"] + 2}
    up.take()
    client.take()
    splice(client, up)
    up.data_received(b"xyz")  # piped to the client
    assert sink.out == b"xyz"
    assert RECEIVED.snapshot() == {"client": before["client"] + 5, "upstream": before["upstream"] + 5}
