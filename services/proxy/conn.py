"""One TCP connection as an asyncio Protocol: buffered reads while a protocol is being spoken,
then a zero-copy-ish pipe to a peer connection with flow control (pause/resume reading).

Both sides of a tunnel are `Conn`s; in pipe mode `data_received` hands each chunk straight to
the peer's transport, with no other Python work per chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

# Past this much unread data we stop reading from the socket (backpressure on a slow parser).
READ_LIMIT = 1 << 20


class ConnClosed(Exception):
    """The peer went away while we were waiting for it."""


class Conn(asyncio.Protocol):
    __slots__ = ("transport", "buf", "eof", "closed", "peer", "_waiter", "_drain", "_paused_by_peer",
                 "on_close", "bytes_in", "_closed_fut", "_reading_paused", "idle_mark")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.eof = False
        self.closed = False
        self.peer: Conn | None = None
        self._waiter: asyncio.Future | None = None
        self._drain: asyncio.Future | None = None
        self._reading_paused = False
        self.on_close: Callable[[], None] | None = None
        self.bytes_in = 0
        self._closed_fut: asyncio.Future | None = None
        self.idle_mark = 0.0

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        peer = self.peer
        if peer is not None:
            peer.transport.write(data)  # type: ignore[union-attr]
            return
        self.buf += data
        if len(self.buf) > READ_LIMIT and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and not peer.closed:
            # Half-close: pass the FIN on, keep the other direction flowing.
            if peer.transport.can_write_eof():  # type: ignore[union-attr]
                peer.transport.write_eof()  # type: ignore[union-attr]
            else:
                peer.close()
        self._wake()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.eof = True
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnClosed())
        if self._closed_fut is not None and not self._closed_fut.done():
            self._closed_fut.set_result(None)
        peer = self.peer
        if peer is not None and not peer.closed:
            # Let buffered bytes reach the peer before it is closed.
            peer.transport.close()  # type: ignore[union-attr]
        if self.on_close is not None:
            cb, self.on_close = self.on_close, None
            cb()

    def pause_writing(self) -> None:
        # Our outgoing buffer is full: stop reading from whoever feeds us.
        if self.peer is not None and not self.peer.closed:
            self.peer.transport.pause_reading()  # type: ignore[union-attr]
        if self._drain is None or self._drain.done():
            self._drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.peer is not None and not self.peer.closed:
            self.peer.transport.resume_reading()  # type: ignore[union-attr]
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- reading while speaking a protocol --
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def read_more(self, timeout: float | None = None) -> bool:
        """Wait until more bytes arrive. False on EOF/close; TimeoutError on timeout."""
        if self.eof:
            return False
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        before = len(self.buf)
        while len(self.buf) == before and not self.eof:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                if timeout is None:
                    await self._waiter
                else:
                    await asyncio.wait_for(self._waiter, timeout)
            finally:
                self._waiter = None
        return len(self.buf) > before

    def take(self, n: int | None = None) -> bytes:
        if n is None or n >= len(self.buf):
            data = bytes(self.buf)
            self.buf.clear()
        else:
            data = bytes(self.buf[:n])
            del self.buf[:n]
        return data

    async def wait_closed(self) -> None:
        if self.closed:
            return
        if self._closed_fut is None:
            self._closed_fut = asyncio.get_running_loop().create_future()
        await self._closed_fut

    # -- writing --
    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise ConnClosed()
        if self._drain is not None and not self._drain.done():
            await self._drain

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    # -- pipe mode --
    def pipe_to(self, peer: "Conn") -> None:
        """From now on every byte from this connection goes to `peer` (buffered bytes first)."""
        if self.buf:
            peer.write(self.take())
        self.peer = peer
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        if self.eof and not peer.closed:
            if self.closed:
                peer.close()
            elif peer.transport.can_write_eof():  # type: ignore[union-attr]
                peer.transport.write_eof()  # type: ignore[union-attr]

    def peername(self) -> tuple[str, int]:
        info = self.transport.get_extra_info("peername") if self.transport else None
        if not info:
            return ("", 0)
        return (str(info[0]), int(info[1]))


def splice(a: Conn, b: Conn) -> None:
    """Join two connections into a tunnel, both ways."""
    a.pipe_to(b)
    b.pipe_to(a)
    # A side that already hit EOF both ways with nothing left: close both.
    if a.closed and b.closed:
        return
