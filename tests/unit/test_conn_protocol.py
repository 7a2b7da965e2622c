"""conn.Conn as an event loop's protocol: compiled it is an extension type that subclasses no asyncio
class (conn.pxd), so it must have every callback a transport may call itself; every Conn (a client, a
plain-HTTP upstream, a tunnel's upstream) is read as a plain protocol, a piped tunnel upstream's bulk
transfer through its `BulkReads`, a buffered protocol on uvloop (by duck typing), and asyncio's own
loops, which call data_received for both, must get the same bytes to the same places."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from services.proxy import conn as conn_module
from services.proxy.conn import BulkReads, Conn, PipeConn, splice
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
    buffered = {"get_buffer", "buffer_updated"}
    for cls in (Conn, ClientConn, PipeConn):
        for name in CALLBACKS - buffered:
            assert callable(getattr(cls, name, None)), (cls, name)
        # plain protocols (uvloop: no get_buffer call per read)
        assert not any(hasattr(cls, name) for name in buffered), cls
    for name in CALLBACKS:  # a bulk transfer's protocol: a buffered one, the rest the connection's
        assert callable(getattr(BulkReads, name, None)), name


class Counted(PipeConn):
    """A PipeConn that notes how its reads arrive (a subclass: an extension type's methods cannot be patched)."""

    __slots__ = ("via",)

    def __init__(self) -> None:
        PipeConn.__init__(self)
        self.via: set[str] = set()

    def data_received(self, data: bytes) -> None:
        self.via.add("data_received")
        PipeConn.data_received(self, data)


def _run(loop_kind: str, main: Any) -> Any:
    if loop_kind == "uvloop":  # what the proxy runs on
        uvloop = pytest.importorskip("uvloop")
        return uvloop.run(main())
    return asyncio.run(main())


def _read_then_eof(loop_kind: str, cls: type[Conn], message: bytes) -> set[str]:
    """A connection of class `cls` reads `message` from its peer, then the peer's end: the same bytes,
    counts and end whichever way its reads arrive. Returns how they arrived (cls.via)."""

    async def main() -> set[str]:
        loop = asyncio.get_running_loop()
        s1, s2 = socket.socketpair()
        s2.setblocking(False)
        _t, conn = await loop.create_connection(cls, sock=s1)  # type: ignore[type-var]
        await loop.sock_sendall(s2, message)
        while len(conn.buf) < len(message):
            assert await conn.read_more(5.0)
        assert conn.take() == message and conn.bytes_in == len(message)
        s2.close()
        assert await conn.read_more(5.0) is False and conn.eof
        conn.close()
        await asyncio.wait_for(conn.wait_closed(), 5)
        return conn.via  # type: ignore[attr-defined]

    return _run(loop_kind, main)


async def _client_and_upstream(
    loop: asyncio.AbstractEventLoop, upstream_cls: Any
) -> tuple[list[socket.socket], Any, Any, Any]:
    """A client `Conn` and an upstream of `upstream_cls`, each on one end of a socketpair: (the other
    ends, non-blocking, as the client's and the origin's sockets; the client; the upstream's
    transport; the upstream)."""
    pairs = [socket.socketpair() for _ in range(2)]
    outer = [b for _a, b in pairs]
    for s in outer:
        s.setblocking(False)
    _t1, client = await loop.create_connection(Conn, sock=pairs[0][0])
    t2, upstream = await loop.create_connection(upstream_cls, sock=pairs[1][0])
    return outer, client, t2, upstream


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_tunnel_upstream_is_read_as_bytes(loop_kind: str) -> None:
    """Not piped, a PipeConn's reads (even large ones) come as bytes to data_received, into its buffer."""
    assert _read_then_eof(loop_kind, Counted, b"GET / HTTP/1.1\r\n\r\n") == {"data_received"}
    assert _read_then_eof(loop_kind, Counted, b"x" * (conn_module.BULK_READ * 4)) == {"data_received"}


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_piped_upstream_moves_to_the_scratch_at_its_first_bulk_read(loop_kind: str) -> None:
    """Piped, a tunnel upstream's small reads come as bytes (its transport's protocol is the connection
    itself: no get_buffer call per read); its first read of BULK_READ bytes or more hands its
    transport's reads over to its `BulkReads` (a buffered protocol into the scratch on uvloop), and
    every byte reaches the peer in order either way; its end is the connection's."""

    async def main() -> tuple[Any, ...]:
        loop = asyncio.get_running_loop()
        outer, client, t2, upstream = await _client_and_upstream(loop, Counted)
        splice(client, upstream)
        seen = []

        async def relay(data: bytes) -> None:
            send = loop.create_task(loop.sock_sendall(outer[1], data))
            got = bytearray()
            while len(got) < len(data):
                chunk = await asyncio.wait_for(loop.sock_recv(outer[0], 1 << 20), 5)
                assert chunk
                got += chunk
            await send
            assert got == data
            seen.append((upstream.bulk is not None, t2.get_protocol() is (upstream.bulk or upstream)))

        await relay(b"HTTP/1.1 200 OK\r\n\r\nsmall")
        await relay(bytes(range(256)) * (3 << 12))  # 3 MiB
        bulk = upstream.bulk
        await relay(b"after")
        for s in outer:
            s.close()
        await asyncio.wait_for(upstream.wait_closed(), 5)
        await asyncio.wait_for(client.wait_closed(), 5)
        return seen, upstream.bytes_in, type(bulk).__name__, bulk.conn is upstream, upstream.eof

    seen, got, bulk, bulk_conn, eof = _run(loop_kind, main)
    assert seen == [(False, True), (True, True), (True, True)]
    assert got == len(b"HTTP/1.1 200 OK\r\n\r\nsmall") + (3 << 20) + 5 and eof
    assert bulk == "BulkReads" and bulk_conn


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_spliced_pair_relays_both_ways_on_either_loop(loop_kind: str) -> None:
    """Pipe mode: uvloop's reads go from the scratch (buffer_updated), asyncio's from data_received
    (bytes), to the peer's socket; a large chunk directly, the rest through the transport."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        outer, client, _t2, upstream = await _client_and_upstream(loop, Conn)
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


class CountedPlain(Conn):
    """A Conn that notes how its reads arrive."""

    __slots__ = ("via",)

    def __init__(self) -> None:
        Conn.__init__(self)
        self.via: set[str] = set()

    def data_received(self, data: bytes) -> None:
        self.via.add("data_received")
        Conn.data_received(self, data)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_conn_is_read_as_a_plain_protocol(loop_kind: str) -> None:
    """A client or a plain-HTTP upstream (a Conn) gets its reads as bytes in data_received on uvloop
    too (no get_buffer call from C per read), into the same buffer, with the same end."""

    assert _read_then_eof(loop_kind, CountedPlain, b"HTTP/1.1 200 OK\r\n\r\n") == {"data_received"}


def test_upstream_connect_makes_the_class_asked_for() -> None:
    """`upstream.connect` gives a Conn (a plain-HTTP upstream: parsed), a PipeConn when asked (a
    tunnel's upstream: read into the scratch, piped); a connect from callbacks (`Connecting`, a new
    CONNECT tunnel's) makes a PipeConn."""
    from services.proxy.upstream import Connecting, connect

    async def main() -> list[type]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        got = []
        for kw in ({}, {"protocol": PipeConn}):
            up = await connect("127.0.0.1", port, 5.0, lambda _ip, _port: None, **kw)
            got.append(type(up))
            up.close()
        fut = loop.create_future()
        c = Connecting("127.0.0.1", port, 5.0, lambda _ip, _port: None, lambda up, _f: fut.set_result(up), loop)
        c.start()
        up = await asyncio.wait_for(fut, 5)
        got.append(type(up))
        up.close()
        server.close()
        return got

    assert _run("uvloop", main) == [Conn, PipeConn, PipeConn]


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_plain_client_and_a_buffered_upstream_relay_both_ways(loop_kind: str) -> None:
    """A tunnel as the proxy makes it: the client a plain Conn (an upload comes as bytes), the upstream a
    PipeConn (a download from the scratch straight to the client's socket)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        outer, client, _t2, upstream = await _client_and_upstream(loop, PipeConn)
        splice(client, upstream)
        for src, dst, size in ((outer[0], outer[1], 3 << 20), (outer[1], outer[0], 3 << 20)):
            data = bytes(range(256)) * (size // 256)
            send = loop.create_task(loop.sock_sendall(src, data))
            got = bytearray()
            while len(got) < len(data):
                chunk = await asyncio.wait_for(loop.sock_recv(dst, 1 << 20), 5)
                assert chunk
                got += chunk
            await send
            assert got == data
        assert client.bytes_in == 3 << 20 and upstream.bytes_in == 3 << 20
        for s in outer:
            s.close()
        await asyncio.wait_for(client.wait_closed(), 5)
        await asyncio.wait_for(upstream.wait_closed(), 5)

    _run(loop_kind, main)
