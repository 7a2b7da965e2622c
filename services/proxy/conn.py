"""One TCP connection as an asyncio Protocol: buffered reads while a protocol is being spoken,
then a zero-copy-ish pipe to a peer connection with flow control (pause/resume reading).

Both sides of a tunnel are `Conn`s; in pipe mode each chunk read goes straight to the peer, with
no other Python work per chunk. Every connection is read as a plain protocol (each read comes as
bytes: no `get_buffer` call from C per read, what is parsed is appended as it came). A tunnel's
upstream (`PipeConn`), once piped, hands its transport's reads over to `BulkReads`, a buffered
protocol, at its first large read (a download): they then land in one shared scratch buffer
(`get_buffer`, on uvloop: the event loop is single-threaded and a read is handed over before the
next one starts) and are written from there to the peer's socket when nothing is queued on it, so
a byte is copied only by the kernel, and only what the socket does not take at once is copied into
the peer transport's queue. Large reads (2 MiB) are what make a relayed download fast.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import termios
from collections.abc import Callable
from time import monotonic
from typing import Any

# Past this much unread data we stop reading from the socket (backpressure on a slow parser).
READ_LIMIT = 1 << 20
PIPE_READ = 2 << 20  # bytes per read in pipe mode (fewer, larger reads: measured ~30% faster than 256 KiB)

_scratch = memoryview(bytearray(PIPE_READ))  # a bulk transfer's reads land here first (`BulkReads`)
# A piped tunnel upstream's read at least this big (a download) moves its reads to the scratch
# (`BulkReads`); below it a read as bytes costs less than a `get_buffer` call from C per read.
BULK_READ = 32 << 10


# A chunk at least this big is written straight to the peer's socket (below it the copy into the
# transport costs less than looking the descriptor up: get_extra_info("socket") builds a socket
# object and makes a getsockname() call, once per connection).
DIRECT_WRITE_MIN = 16 << 10
FD_UNKNOWN = -2


def _kernel_unsent(fd: int) -> int:
    """Bytes the kernel still holds for the peer of socket `fd`: not sent, or not acknowledged
    (SIOCOUTQ, which is TIOCOUTQ's number on Linux); 0 where it cannot say."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except (OSError, ValueError):
        return 0


def _fileno(transport: asyncio.Transport) -> int:
    sock = transport.get_extra_info("socket")
    try:
        return sock.fileno() if sock is not None else -1
    except (AttributeError, OSError):
        return -1


class ConnClosed(Exception):
    """The peer went away while we were waiting for it."""


class WriteStalled(Exception):
    """The peer took no byte of what was written to it for a whole deadline (a client that stopped
    reading its response; an upstream that stopped reading its request body)."""


class Received:
    """Bytes received by the process's connections, by side (GET /metrics: greyproxy_proxy_bytes_relayed),
    bumped on every read (compiled: C counters, conn.pxd)."""

    __slots__ = ("client", "upstream")

    def __init__(self) -> None:
        self.client = 0  # by client connections (`Conn.client_side`)
        self.upstream = 0

    def add(self, client_side: bool, n: int) -> None:
        """n bytes read by a client connection (`client_side`) or an upstream one."""
        if client_side:
            self.client += n
        else:
            self.upstream += n

    def snapshot(self) -> dict[str, int]:
        return {"client": self.client, "upstream": self.upstream}


RECEIVED = Received()


class Conn:
    """One TCP connection, an asyncio protocol (every callback a transport may call is here).

    Compiled, an extension type (conn.pxd: its attributes C struct fields, its callbacks and steps
    called through a C vtable), which cannot subclass asyncio.Protocol (a Python class): so it
    subclasses nothing, as Python too. A plain protocol: each read comes as bytes to `data_received`
    (an accepted client, a plain-HTTP upstream: what is parsed; a client's upload through a tunnel, in
    uvloop's reads of up to 256 KiB). A tunnel's upstream is a `PipeConn`, whose bulk transfers are
    read into the scratch (`BulkReads`).
    """

    __slots__ = (
        "client_side",
        "transport",
        "buf",
        "eof",
        "closed",
        "peer",
        "_waiter",
        "_drain",
        "on_close",
        "bytes_in",
        "_closed_fut",
        "_reading_paused",
        "_fd",
        "_deadline",
        "_timer",
        "_timed",
        "_loop",
        "watcher",
    )

    def __init__(self) -> None:
        self._setup()

    def _setup(self) -> None:
        """A new connection's attributes (`__init__`'s; a subclass's `__init__` calls this, compiled a C
        call, instead of `Conn.__init__` through Python)."""
        self.client_side = False  # an accepted client connection (context.ClientConn): counted as such in RECEIVED
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
        # The socket's descriptor once piped, for direct writes from the peer (-1: none, FD_UNKNOWN:
        # not looked up yet; a tunnel that only ever passes small chunks never looks it up).
        self._fd = -1
        # The current read's deadline (loop time, None: none) and the one timer per connection that
        # enforces it: re-armed only when it would fire late, so a read costs no timer of its own.
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timed: asyncio.Future | None = None  # the waiter that deadline is for
        # The event loop, looked up once: asyncio.get_running_loop() costs a getpid() system call
        # (CPython checks the loop was not inherited across a fork), which adds up per read.
        self._loop: asyncio.AbstractEventLoop | None = None
        # Called, in place of waking a reader, when bytes, EOF or the close arrive: the HTTP proxy's
        # kept-alive request cycle (keepalive.py) runs in these callbacks while nobody reads.
        self.watcher: Callable[[], None] | None = None

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def _send(self, data: bytes | memoryview, n: int) -> None:
        """Write data[:n] to this connection (a chunk read in pipe mode; `n` is all of it when `data` is
        bytes): straight to the socket when nothing is queued on the transport (ordering kept), the
        rest through the transport (copied when `data` is the scratch, which is reused; bytes not
        written at all are passed as they are)."""
        t = self.transport
        sent = 0
        fd = self._fd
        if fd == FD_UNKNOWN and n >= DIRECT_WRITE_MIN:
            fd = self._fd = _fileno(t)  # type: ignore[arg-type]
        if fd >= 0 and not t.is_closing() and not t.get_write_buffer_size():  # type: ignore[union-attr]
            try:
                sent = os.write(fd, data[:n])
            except OSError:  # (BlockingIOError included) the transport's own write reports an error below
                sent = 0
        if sent == 0 and type(data) is bytes:
            t.write(data)  # type: ignore[union-attr]  # (a read as bytes, all of it: as it came, no copy)
        elif sent < n:
            t.write(bytes(data[sent:n]))  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        """Bytes read (a bulk transfer's on uvloop come to `BulkReads.buffer_updated`): to the peer in pipe mode,
        else appended to `buf` for the reader."""
        n = len(data)
        self.bytes_in += n
        received: Received = RECEIVED
        received.add(self.client_side, n)
        peer = self.peer
        if peer is not None:
            if not peer.closed:  # (as buffer_updated)
                peer._send(data, len(data))
            return
        self.buf.extend(data)  # (bytearray.extend: without += dispatching through the number slots first)
        if len(self.buf) > READ_LIMIT and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and not peer.closed:
            if peer.eof:
                # Both directions are finished: close both (after their buffered bytes). An
                # open transport is never closed for us once eof_received returned True.
                _finish_tunnel(self, peer)
                return True
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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnClosed())
        if self._closed_fut is not None and not self._closed_fut.done():
            self._closed_fut.set_result(None)
        peer = self.peer
        if peer is not None:
            if not peer.closed:
                # Let buffered bytes reach the peer before it is closed.
                peer.transport.close()  # type: ignore[union-attr]
            elif peer.peer is self:
                # Both ends are gone: unlink them, so that the pair is freed at once by its
                # reference counts and not left for the cyclic garbage collector.
                self.peer = peer.peer = None
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
        watcher = self.watcher
        if watcher is not None:
            watcher()  # (a reader waiting too is woken as well: an exchange watches a body's relay)
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
        buf = self.buf
        before = len(buf)
        loop = self._loop or self._bind_loop()
        fut = None
        deadline = None if timeout is None else loop.time() + timeout
        # The usual case, one reader at a time: the connection's timer enforces this read's deadline.
        # A reader that starts while another still waits (that one is then left to its deadline:
        # only the newest waiter is woken) keeps a timer of its own, as every read once did.
        shared = self._waiter is None or self._waiter.done()
        if shared:
            self._deadline = deadline
            if deadline is not None:
                timer = self._timer
                if timer is None or timer.when() > deadline:
                    if timer is not None:
                        timer.cancel()
                    self._timer = loop.call_at(deadline, self._on_timer)
        try:
            while len(buf) == before and not self.eof:
                # A local future: a cancelled or timed-out earlier reader must never clear the waiter
                # of a reader that started after it (it would then sleep through the next bytes).
                fut = loop.create_future()
                self._waiter = fut
                own = None
                if shared:
                    self._timed = fut
                elif deadline is not None:
                    own = loop.call_at(deadline, _expire, fut)
                try:
                    await fut
                finally:
                    if own is not None:
                        own.cancel()
                    if self._waiter is fut:
                        self._waiter = None
        finally:
            if shared and self._timed is fut:
                self._deadline = self._timed = None  # this read is over: the timer, if armed, finds nothing
        return len(buf) > before

    def resume_reading(self) -> None:
        """Read from the socket again if a full buffer (READ_LIMIT) paused it (read_more does this too)."""
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        self._loop = loop = asyncio.get_running_loop()
        return loop

    def _on_timer(self) -> None:
        """The connection's read timer: the timed read times out when its deadline has come, else the
        timer waits on until that deadline (a later read moved it, or the read is between wakeups)."""
        self._timer = None
        fut, deadline = self._timed, self._deadline
        if deadline is None:
            return  # nobody is waiting with a deadline (the next timed read arms it again)
        loop = self._loop or self._bind_loop()
        if fut is not None and not fut.done() and loop.time() + 0.001 >= deadline:  # the clock has ms steps
            self._deadline = self._timed = None
            fut.set_exception(TimeoutError())
        else:
            self._timer = loop.call_at(deadline, self._on_timer)

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

    @property
    def write_paused(self) -> bool:
        """The transport's buffer is full: `drain` would wait."""
        return self._drain is not None and not self._drain.done()

    async def drain(self, timeout: float | None = None) -> None:
        """Until the transport's buffer is below its low mark (at once when it is). `timeout`: at
        most that long without the peer taking a byte (`unsent` not going down), else WriteStalled;
        a slow peer that keeps taking some is waited for."""
        if self.closed:
            raise ConnClosed()
        d = self._drain
        if d is not None and not d.done():
            if timeout is None:
                await d
                return
            left = self.unsent()
            while True:
                done, _pending = await asyncio.wait((d,), timeout=timeout)
                if done:
                    d.result()
                    return
                now = self.unsent()
                if now >= left:
                    raise WriteStalled(timeout)
                left = now  # the peer took some: another window

    def unsent(self) -> int:
        """Bytes written to this connection that its peer has not taken yet: what the transport
        still buffers and what the kernel still holds (a slow peer's progress shows here)."""
        t = self.transport
        if t is None:
            return 0
        n = t.get_write_buffer_size()
        fd = _fileno(t)
        return n + (_kernel_unsent(fd) if fd >= 0 else 0)

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
        self._fd = FD_UNKNOWN  # looked up when the first large chunk is written to it
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        if self.eof and not peer.closed:
            if self.closed:
                peer.close()
            elif peer.eof and peer.peer is self:
                _finish_tunnel(self, peer)
            elif peer.transport.can_write_eof():  # type: ignore[union-attr]
                peer.transport.write_eof()  # type: ignore[union-attr]

    def peername(self) -> tuple[str, int]:
        info = self.transport.get_extra_info("peername") if self.transport else None
        if not info:
            return ("", 0)
        return (str(info[0]), int(info[1]))


class ConnectWaiter:
    """What made a `PipeConn` and waits for it (`upstream.Connecting`, which derives from this): told
    at its `connection_made` (`_made`) and at its next callback (`_finish`). Compiled, both C calls
    through the vtable (conn.pxd; upstream.py's class cannot be cimported here)."""

    __slots__ = ()

    def _made(self, conn: PipeConn) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError


class PipeConn(Conn):
    """A tunnel's upstream connection: read as a plain protocol (a tunnel of small exchanges pays no
    `get_buffer` call from C, taking the GIL again, ~1 000 instructions, per read), until, piped, it
    reads a bulk transfer (one read of `BULK_READ` bytes or more): its transport's reads then go to
    its `BulkReads` (`transport.set_protocol`), into the scratch and from there straight to the
    peer's socket. The connection is the same `Conn` for everyone else (its peer, the tunnel, the
    gate's close), whichever protocol its transport calls."""

    __slots__ = ("connecting", "bulk")

    def __init__(self) -> None:
        self._setup()
        # The connect (`upstream.Connecting`) that made this connection, while its coroutine is still
        # to be run to its end: it went on at `connection_made` without waiting for it (see
        # `Connecting._made`), and it is ended at this connection's next callback (`_connect_over`).
        self.connecting: ConnectWaiter | None = None
        self.bulk: BulkReads | None = None  # its transport's protocol once it reads a bulk transfer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        c = self.connecting
        if c is not None:
            c._made(self)  # the tunnel goes on now (not a loop turn later, from its waiter's callback)

    def _connect_over(self) -> None:
        """The connect's coroutine, its waiter set since `connection_made`, run to its end (once)."""
        c, self.connecting = self.connecting, None
        c._finish()  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if self.connecting is not None:
            self._connect_over()
        if self.bulk is None and len(data) >= BULK_READ and self.peer is not None:
            self._to_bulk()  # (this read goes on as it came, the next ones into the scratch)
        Conn.data_received(self, data)

    def _to_bulk(self) -> None:
        """From now on the transport's reads go to a `BulkReads` (its reads restarted with the
        scratch as their buffer on uvloop, which takes a protocol with `get_buffer` for a buffered one)."""
        bulk = self.bulk = BulkReads()
        bulk.conn = self
        self.transport.set_protocol(bulk)  # type: ignore[union-attr,arg-type]  # (a protocol by duck typing)

    def eof_received(self) -> bool:
        if self.connecting is not None:
            self._connect_over()
        return Conn.eof_received(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.connecting is not None:
            self._connect_over()
        Conn.connection_lost(self, exc)


class BulkReads:
    """A piped `PipeConn`'s transport protocol once it reads a bulk transfer: a buffered protocol (uvloop
    serves any protocol with `get_buffer` that is not an asyncio.Protocol as one) whose reads land in
    the shared scratch (2 MiB) and go from there to the peer's socket (`Conn._send`); the other
    callbacks are the connection's. asyncio's own loops (some tests) see no BufferedProtocol and
    call `data_received`, which does the same with the bytes."""

    __slots__ = ("conn",)

    conn: PipeConn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn.connection_made(transport)  # (not called: the transport was made before)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _scratch

    def buffer_updated(self, nbytes: int) -> None:
        conn = self.conn
        conn.bytes_in += nbytes
        received: Received = RECEIVED
        received.add(conn.client_side, nbytes)
        peer = conn.peer
        if peer is not None and not peer.closed:  # else nobody is left to deliver it to (and we are being closed)
            peer._send(_scratch, nbytes)

    def data_received(self, data: bytes) -> None:
        Conn.data_received(self.conn, data)

    def eof_received(self) -> bool:
        return self.conn.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.connection_lost(exc)

    def pause_writing(self) -> None:
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.conn.resume_writing()


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


def _finish_tunnel(a: Conn, b: Conn) -> None:
    """Both ends of a tunnel sent their FIN: close both transports (each flushes its writes first)."""
    for c in (a, b):
        if not c.closed and c.transport is not None:
            c.transport.close()
    a._wake()
    b._wake()


def splice(a: Conn, b: Conn) -> None:
    """Join two connections into a tunnel, both ways."""
    a.pipe_to(b)
    b.pipe_to(a)
    # A side that already hit EOF both ways with nothing left: close both.
    if a.closed and b.closed:
        return


async def wait_either(a: Conn, b: Conn | None, timeout: float | None) -> bool:
    """Wait until `a` or `b` gets more bytes, reaches EOF or closes: True; False after `timeout`.

    Without a task: one future is both connections' waiter (what `read_more` waits on), bounded by
    `a`'s own read timer as a `read_more` is (usually already armed for an earlier, nearer deadline:
    no timer of its own). The caller looks at what arrived (a wakeup may bring nothing new: look again).
    """
    started = _either_start(a, b, timeout)
    if started is None:
        return True  # at EOF already
    fut, own = started
    try:
        await fut
        return True
    except TimeoutError:
        return False
    finally:
        _either_end(a, b, fut, own)


def _either_start(
    a: Conn, b: Conn | None, timeout: float | None
) -> tuple[asyncio.Future, asyncio.TimerHandle | None] | None:
    """`wait_either`'s start: the future both connections wake and the timer of its own (if it needs
    one); None when either is at EOF already. (Not in the coroutine: compiled, here the connections
    are read as C structs, conn.pxd.)"""
    if a.eof or (b is not None and b.eof):
        return None
    loop = a._loop or a._bind_loop()
    shared = a._waiter is None or a._waiter.done()  # else someone reads `a` too: a timer of our own
    fut = loop.create_future()
    for c in (a, b):
        if c is not None:
            c._waiter = fut
            if c._reading_paused:
                c._reading_paused = False
                c.transport.resume_reading()  # type: ignore[union-attr]
    own = None
    if timeout is not None:
        deadline = loop.time() + max(0.0, timeout)
        if shared:
            a._deadline, a._timed = deadline, fut
            timer = a._timer
            if timer is None or timer.when() > deadline:
                if timer is not None:
                    timer.cancel()
                a._timer = loop.call_at(deadline, a._on_timer)
        else:
            own = loop.call_at(deadline, _expire, fut)
    return fut, own


def _either_end(a: Conn, b: Conn | None, fut: asyncio.Future, own: asyncio.TimerHandle | None) -> None:
    """`wait_either`'s end, however it ended."""
    if own is not None:
        own.cancel()
    if a._timed is fut:
        a._deadline = a._timed = None  # the timer, if still armed, finds nothing to time out
    # A later reader's waiter is never cleared (see read_more).
    if a._waiter is fut:
        a._waiter = None
    if b is not None and b._waiter is fut:
        b._waiter = None


class FirstDeadlines:
    """Deadlines that come in the order they were queued (waits that share one timeout), served by one
    timer at the first one instead of a uvloop timer each (one armed and cancelled costs ~7 000
    instructions, ~2 % of a spliced tunnel's). `waiting` maps each waiter to its deadline
    (time.monotonic: a C call, where the loop's `time()`, a method called by name, costs twice as
    much; the timer runs on the loop's clock, which lags it by at most a few ms, its ms steps read
    once an iteration: a timer that comes early is armed again for the rest), in that order; a
    subclass queues waiters and says what `expire(waiter)` does once its deadline has come."""

    __slots__ = ("waiting", "timer", "loop", "last")

    def __init__(self) -> None:
        self.waiting: dict[Any, float] = {}  # waiter -> its deadline (time.monotonic), in that order
        self.timer: asyncio.TimerHandle | None = None  # at the first one's deadline or before
        self.loop: asyncio.AbstractEventLoop | None = None  # the timer's (and the waiters')
        self.last = 0.0  # the deadline last queued (no waiter still queued has a later one)

    def __len__(self) -> int:
        return len(self.waiting)

    def in_order(self, waiter: object, deadline: float) -> bool:
        """Whether `waiter` can join the queue: not in it already, and not due before its last one."""
        waiting = self.waiting
        return not waiting or (deadline >= self.last and waiter not in waiting)

    def queue(self, waiter: object, loop: asyncio.AbstractEventLoop, deadline: float) -> bool:
        """Queue `waiter` until `deadline` (time.monotonic; `expire(waiter)` then); False: not queued,
        the caller times it itself. One event loop's waiters at a time: a waiter of another loop
        while this one's wait (threads), or one out of order (`in_order`), is not queued; the
        waiters of a loop that closed (nothing will end them) are dropped when the next loop's
        first one comes."""
        waiting = self.waiting
        if loop is not self.loop:
            old = self.loop
            if waiting and old is not None and not old.is_closed():
                return False  # another live loop's waiters
            waiting.clear()  # (a closed loop's: they can never end)
            if self.timer is not None and old is not None and not old.is_closed():
                self.timer.cancel()
            self.timer, self.loop = None, loop
        if not self.in_order(waiter, deadline):
            return False
        waiting[waiter] = deadline
        self.last = deadline
        if self.timer is None:
            self.timer = loop.call_later(deadline - monotonic(), self._fire, loop)
        return True

    def expire(self, waiter: Any) -> None:
        raise NotImplementedError

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self.loop:
            return  # a timer of a loop given up for another
        self.timer = None
        waiting = self.waiting
        now = monotonic()
        while waiting:
            waiter, deadline = next(iter(waiting.items()))
            if deadline > now + 0.001:  # (a deadline a millisecond away has come: the loop's clock has ms steps)
                self.timer = loop.call_later(deadline - now, self._fire, loop)
                return
            del waiting[waiter]
            self.expire(waiter)
