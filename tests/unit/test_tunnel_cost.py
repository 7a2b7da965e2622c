"""The per-tunnel plumbing, without the stack: the first-bytes wait runs in the handler's own task
(no task per tunnel), and a closed tunnel's pair of connections is freed by reference counting
(no reference cycle left for the garbage collector; the proxy raises its collection threshold on
that basis, services/proxy/service.py `tune_gc`).
"""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import Iterator
from typing import Any

import pytest

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
