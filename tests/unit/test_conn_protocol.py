"""conn.Conn as an event loop's protocol: compiled it is an extension type that subclasses no asyncio
class (conn.pxd), so it must have every callback a transport may call itself, uvloop must still serve
it as a buffered protocol (by duck typing) and asyncio's own loops, which then call data_received,
must get the same bytes to the same places."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from services.proxy.conn import Conn, StreamConn, splice
from services.proxy.context import ClientConn

CALLBACKS = {
    "connection_made",
    "connection_lost",
    "pause_writing",
    "resume_writing",
    "data_received",
    "eof_received",
    "get_buffer",
    "buffer_updated",
}


def test_every_callback_of_asyncios_protocols_is_on_the_connection_classes() -> None:
    asyncio_callbacks = {
        name
        for cls in (asyncio.BufferedProtocol, asyncio.Protocol)
        for name in dir(cls)
        if not name.startswith("_") and callable(getattr(cls, name))
    }
    assert asyncio_callbacks == CALLBACKS  # (a callback asyncio adds one day must be added to Conn)
    for cls in (Conn, ClientConn):
        for name in CALLBACKS:
            assert callable(getattr(cls, name, None)), (cls, name)


class Counted(Conn):
    """A Conn that notes how its reads arrive (a subclass: an extension type's methods cannot be patched)."""

    __slots__ = ("via",)

    def __init__(self) -> None:
        Conn.__init__(self)
        self.via: set[str] = set()

    def get_buffer(self, sizehint: int) -> Any:
        self.via.add("get_buffer")
        return Conn.get_buffer(self, sizehint)

    def data_received(self, data: bytes) -> None:
        self.via.add("data_received")
        Conn.data_received(self, data)


def _run(loop_kind: str, main: Any) -> Any:
    if loop_kind == "uvloop":  # what the proxy runs on
        uvloop = pytest.importorskip("uvloop")
        return uvloop.run(main())
    return asyncio.run(main())


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_uvloop_reads_into_the_scratch_and_asyncio_calls_data_received(loop_kind: str) -> None:
    async def main() -> set[str]:
        loop = asyncio.get_running_loop()
        s1, s2 = socket.socketpair()
        s2.setblocking(False)
        _t, conn = await loop.create_connection(Counted, sock=s1)  # type: ignore[type-var]
        await loop.sock_sendall(s2, b"GET / HTTP/1.1\r\n\r\n")
        while len(conn.buf) < 18:
            assert await conn.read_more(5.0)
        assert conn.take() == b"GET / HTTP/1.1\r\n\r\n" and conn.bytes_in == 18
        s2.close()
        assert await conn.read_more(5.0) is False and conn.eof
        conn.close()
        await asyncio.wait_for(conn.wait_closed(), 5)
        return conn.via

    via = _run(loop_kind, main)
    assert via == ({"get_buffer", "data_received"} if loop_kind == "uvloop" else {"data_received"})


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_spliced_pair_relays_both_ways_on_either_loop(loop_kind: str) -> None:
    """Pipe mode: uvloop's reads go from the scratch (buffer_updated), asyncio's from data_received
    (bytes), to the peer's socket; a large chunk directly, the rest through the transport."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pairs = [socket.socketpair() for _ in range(2)]
        outer = [b for _a, b in pairs]
        for s in outer:
            s.setblocking(False)
        (_t1, client), (_t2, upstream) = [await loop.create_connection(Conn, sock=a) for a, _b in pairs]  # type: ignore[type-var]
        splice(client, upstream)
        for src, dst, size in ((outer[0], outer[1], 100), (outer[1], outer[0], 3 << 20)):
            data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            send = loop.create_task(loop.sock_sendall(src, data))
            got = bytearray()
            while len(got) < len(data):
                chunk = await asyncio.wait_for(loop.sock_recv(dst, 1 << 20), 5)
                assert chunk
                got += chunk
            await send
            assert got == data
        assert client.bytes_in == 100 and upstream.bytes_in == 3 << 20
        for s in outer:
            s.close()
        await asyncio.wait_for(client.wait_closed(), 5)
        await asyncio.wait_for(upstream.wait_closed(), 5)

    _run(loop_kind, main)


class CountedStream(StreamConn):
    """A StreamConn that notes how its reads arrive."""

    __slots__ = ("via",)

    def __init__(self) -> None:
        StreamConn.__init__(self)
        self.via: set[str] = set()

    def get_buffer(self, sizehint: int) -> Any:
        self.via.add("get_buffer")
        return Conn.get_buffer(self, sizehint)

    def data_received(self, data: bytes) -> None:
        self.via.add("data_received")
        Conn.data_received(self, data)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_stream_conn_is_read_as_a_plain_protocol(loop_kind: str) -> None:
    """A plain-HTTP upstream (conn.StreamConn) gets its reads as bytes in data_received on uvloop too
    (no get_buffer call per read), into the same buffer, with the same end."""

    async def main() -> set[str]:
        loop = asyncio.get_running_loop()
        s1, s2 = socket.socketpair()
        s2.setblocking(False)
        _t, conn = await loop.create_connection(CountedStream, sock=s1)  # type: ignore[type-var]
        await loop.sock_sendall(s2, b"HTTP/1.1 200 OK\r\n\r\n")
        while len(conn.buf) < 19:
            assert await conn.read_more(5.0)
        assert conn.take() == b"HTTP/1.1 200 OK\r\n\r\n" and conn.bytes_in == 19
        s2.close()
        assert await conn.read_more(5.0) is False and conn.eof
        conn.close()
        await asyncio.wait_for(conn.wait_closed(), 5)
        return conn.via

    assert _run(loop_kind, main) == {"data_received"}


def test_upstream_connect_makes_the_class_asked_for() -> None:
    """`upstream.connect(..., protocol=StreamConn)` (the HTTP proxy's plain-HTTP upstreams) gives a
    StreamConn; without it a Conn (a tunnel's upstream: read into the scratch, piped)."""
    from services.proxy.upstream import connect

    async def main() -> list[type]:
        server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        got = []
        for kw in ({"protocol": StreamConn}, {}):
            up = await connect("127.0.0.1", port, 5.0, lambda _ip, _port: None, **kw)
            got.append(type(up))
            up.close()
        server.close()
        return got

    assert _run("uvloop", main) == [StreamConn, Conn]
