"""Connecting upstream: async DNS, the guard on every resolved address, clear failure kinds."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from time import monotonic
from typing import Any

from .conn import Conn, ConnectWaiter, FirstDeadlines, PipeConn


class UpstreamFailure(Exception):
    """Why an allowed connection could not reach its destination."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # 'dns' | 'refused' | 'unreachable' | 'network' | 'timeout' | 'guard'

    def http_answer(self) -> tuple[int, str, str]:
        """(status, reason, text) of the HTTP answer to this failure."""
        if self.kind == "guard":
            return 403, "Forbidden", f"Blocked by Greyproxy: {self}"
        if self.kind == "timeout":
            return 504, "Gateway Timeout", f"Greyproxy: {self}"
        return 502, "Bad Gateway", f"Greyproxy: {self}"


_inet_pton = socket.inet_pton


def _literal(host: str, port: int) -> list[tuple[str, int]] | None:
    """An IP literal needs no lookup: (ip, port) at once (a resolver round trip through a worker
    thread costs more than the whole request on loopback). None for a name."""
    if not host:
        return None
    if _ipv4(host):
        return [(host, port)]
    if ":" not in host:
        return None  # a name (an IPv6 literal has a colon): no exceptions raised
    try:
        _inet_pton(socket.AF_INET6, host)
    except (OSError, ValueError):
        return None
    return [(host, port)]


def _ipv4(host: str) -> bool:
    """Whether inet_pton(AF_INET) takes `host`: four dot-separated decimal octets, each at most 255
    and without a leading zero, nothing else. Read here (compiled: a C loop over the characters)
    instead of calling it: a call costs ~1 000 instructions on every new tunnel to an address."""
    octets = 0
    value = -1  # the current octet's (-1: no digit of it yet)
    for ch in host:
        if "0" <= ch <= "9":
            if value == 0:
                return False  # a leading zero
            if value < 0:
                octets += 1
                if octets > 4:
                    return False
                value = 0
            value = value * 10 + (ord(ch) - 48)
            if value > 255:
                return False
        elif ch == "." and value >= 0 and octets < 4:
            value = -1
        else:
            return False
    return octets == 4 and value >= 0


# A name's addresses are reused for a few seconds: a lookup costs ~50 µs of CPU even when
# /etc/hosts answers (a resolver thread and back), more through DNS, on every new tunnel or
# connection to that name. Short enough that a moved server is followed soon; a connection that
# fails on every cached address looks the name up again at once (`connect`).
ADDRESS_TTL = 10.0
ADDRESS_CACHE = 10_000  # names kept (they come from clients): past this the cache starts over

_addresses: dict[tuple[str, int], tuple[list[tuple[str, int]], float]] = {}


def forget(host: str, port: int) -> None:
    """Drop a name's cached addresses (they did not answer)."""
    _addresses.pop((host, port), None)


async def _resolve(loop: asyncio.AbstractEventLoop, host: str, port: int, timeout: float) -> list[tuple[str, int]]:
    addrs = _literal(host, port)
    if addrs is not None:
        return addrs
    now = loop.time()
    hit = _addresses.get((host, port))
    if hit is not None and hit[1] > now:
        return hit[0]
    lookup = _lookup(loop, host, port, timeout)
    # Its deadline (asyncio.timeout) needs a task: a request step driven by hand from a
    # connection's callbacks (keepalive.py) has none, so the lookup gets one of its own there,
    # which the step then waits for as it would for any future (and hands over to the handler).
    addrs = await (lookup if asyncio.current_task(loop) is not None else loop.create_task(lookup))
    if len(_addresses) >= ADDRESS_CACHE:
        _addresses.clear()
    _addresses[(host, port)] = (addrs, now + ADDRESS_TTL)
    return addrs


async def _lookup(loop: asyncio.AbstractEventLoop, host: str, port: int, timeout: float) -> list[tuple[str, int]]:
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except TimeoutError:
        raise UpstreamFailure("timeout", f"DNS lookup for {host} timed out") from None
    except (socket.gaierror, UnicodeError) as exc:
        raise UpstreamFailure("dns", f"DNS lookup for {host} failed: {exc}") from None
    if not infos:
        raise UpstreamFailure("dns", f"no address for {host}")
    return [(addr[0], addr[1]) for _f, _t, _p, _c, addr in infos]


resolve = _resolve  # the gate judges a name's addresses with the same lookup


async def connect(
    host: str,
    port: int,
    timeout: float,
    guard: Callable[[str, int], bool | str | None],
    protocol: type[Conn] = Conn,
) -> Conn:
    """Connect to the first address of `host` that answers. `guard(ip, port)` judges every address
    before it is tried: truthy refuses the whole connection (a string says why). `protocol`: the
    connection's class (`conn.PipeConn` for a tunnel's upstream)."""
    loop = asyncio.get_running_loop()
    now = loop.time()
    deadline = now + timeout
    addrs = _literal(host, port)
    if addrs is not None:  # an IP literal: nothing to look up, nothing cached
        return await _connect_first(loop, host, port, addrs, deadline, guard, protocol)
    hit = _addresses.get((host, port))
    cached = hit is not None and hit[1] > now
    addrs = hit[0] if cached else await _resolve(loop, host, port, timeout)  # type: ignore[index]
    try:
        return await _connect_first(loop, host, port, addrs, deadline, guard, protocol)
    except UpstreamFailure as exc:
        if not cached or exc.kind in ("guard", "timeout"):
            raise
    # Every cached address failed: the name may have moved. Once more with a fresh lookup.
    forget(host, port)
    addrs = await _resolve(loop, host, port, max(0.0, deadline - loop.time()))
    return await _connect_first(loop, host, port, addrs, deadline, guard, protocol)


class _Deadline:
    """Cancels the connecting task at its deadline (what asyncio.timeout does, with one object and
    one timer: a Timeout object, its state checks and a second loop lookup cost more than the rest
    of connect's own Python on loopback)."""

    __slots__ = ("task", "fired")

    def __init__(self, task: asyncio.Task) -> None:
        self.task = task
        self.fired = False

    def __call__(self) -> None:
        self.fired = True
        self.task.cancel()


async def _connect_first(
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    addrs: list[tuple[str, int]],
    deadline: float,
    guard: Callable[[str, int], bool | str | None],
    protocol: type[Conn] = Conn,
) -> Conn:
    # Its deadline (_Deadline) cancels the connecting task: a step driven by hand from a connection's
    # callbacks (keepalive.py: an intercepted tunnel's request past its first wait) has none, so the
    # connect gets a task of its own there, which the step waits for as for any future.
    task = asyncio.current_task(loop)
    if task is None:
        return await loop.create_task(_connect_first(loop, host, port, addrs, deadline, guard, protocol))
    last: UpstreamFailure | None = None
    for ip, aport in addrs:
        why = guard(ip, port)
        if why:
            # A name that resolves onto our own listeners, or into an address a rule denies:
            # refuse like a direct request.
            reason = why if isinstance(why, str) else "resolves to this proxy's own listener"
            raise UpstreamFailure("guard", f"{host}:{port} {reason}")
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise UpstreamFailure("timeout", f"connecting to {host}:{port} timed out")
        # Not wait_for (one more task per call), nor asyncio.timeout (see _Deadline).
        expire = _Deadline(task)
        timer = loop.call_at(deadline, expire)
        try:
            _t, conn = await loop.create_connection(protocol, ip, aport)  # type: ignore[type-var]  # (a protocol by duck typing, conn.Conn)
            return conn  # TCP_NODELAY: set on every TCP transport by uvloop and asyncio alike
        except asyncio.CancelledError:
            # Ours (the deadline) unless someone else cancelled the task too.
            if not expire.fired or task.uncancel() > 0:
                raise
            last = UpstreamFailure("timeout", f"connecting to {host}:{port} timed out")
        except OSError as exc:
            last = _failure(exc, host, port)
        finally:
            timer.cancel()
    assert last is not None
    raise last


def _failure(exc: OSError, host: str, port: int) -> UpstreamFailure:
    """The failure kind of a connect attempt that raised `exc`."""
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
        return UpstreamFailure("refused", f"connection to {host}:{port} refused")
    if exc.errno in (errno.ENETUNREACH, errno.EAFNOSUPPORT):
        return UpstreamFailure("network", f"network unreachable for {host}:{port}")
    return UpstreamFailure("unreachable", f"cannot reach {host}:{port}: {exc.strerror or exc}")


class Connecting(ConnectWaiter):
    """`connect` driven from callbacks, for a caller without a task (keepalive.py's CONNECT): the
    same addresses in the same order, the same guard, deadline and failures, `done(conn, None)` or
    `done(None, failure)` called once. Only where `connect` would not look a name up: `start` is
    False for a name whose addresses are not cached, and `done(None, None)` says that every cached
    address failed and the name must be looked up again (`connect`, which the caller's task runs:
    the cache entry is already dropped)."""

    __slots__ = (
        "loop",
        "host",
        "port",
        "addrs",
        "i",
        "deadline",
        "guard",
        "done",
        "coro",
        "fut",
        "timer",
        "fired",
        "cached",
        "conn",
        "made",
    )

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float,
        guard: Callable[[str, int], bool | str | None],
        done: Callable[[Conn | None, UpstreamFailure | None], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.loop, self.host, self.port, self.guard, self.done = loop, host, port, guard, done
        # (time.monotonic: the clock of the connects' shared queue, conn.FirstDeadlines)
        self.deadline = monotonic() + timeout
        self.addrs: list[tuple[str, int]] = []
        self.i = 0
        self.coro: Any = None
        self.fut: asyncio.Future | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.fired = False
        self.cached = False
        self.conn: PipeConn | None = None  # the current attempt's protocol (`__call__`)
        self.made = False  # `done` called from the connection's `connection_made` (`_made`)

    def start(self) -> bool:
        """Begin connecting (False: a name to look up first; nothing was done)."""
        host, port = self.host, self.port
        addrs = _literal(host, port)
        if addrs is None:
            hit = _addresses.get((host, port))
            if hit is None or hit[1] <= self.loop.time():
                return False
            addrs, self.cached = hit[0], True
        self.addrs = addrs
        self._try()
        return True

    def _try(self) -> None:
        """The next address (as `_connect_first`'s loop)."""
        host, port, loop = self.host, self.port, self.loop
        ip, aport = self.addrs[self.i]
        self.i += 1
        why = self.guard(ip, port)
        if why:
            reason = why if isinstance(why, str) else "resolves to this proxy's own listener"
            self.done(None, UpstreamFailure("guard", f"{host}:{port} {reason}"))
            return
        if self.deadline - monotonic() <= 0:
            self.done(None, UpstreamFailure("timeout", f"connecting to {host}:{port} timed out"))
            return
        self.fired = False
        # The deadline: in the loop's shared queue (`_ConnectDeadlines`), else a timer of its own.
        deadlines = _DEADLINES  # (compiled: a C call, upstream.pxd)
        self.timer = None if deadlines.arm(self) else loop.call_later(self.deadline - monotonic(), self._expire)
        self.coro = loop.create_connection(self, ip, aport)  # (its protocol factory: `__call__`)
        self._step(None)

    def __call__(self, fut: Any = None) -> Conn | None:
        """Without an argument, the attempt's protocol (`create_connection` calls this as its protocol
        factory; a bound method would be one more object per connect), kept: the connect's end need
        not read it from the coroutine's StopIteration (compiled, an exception caught by name gets a
        traceback). With one, the callback of the future the connecting coroutine waits for (`_step`;
        `_finish` once `_made`)."""
        if fut is None:
            conn = self.conn = PipeConn()  # (a tunnel's upstream)
            conn.connecting = self
            return conn
        if self.made:
            self._finish()
        else:
            self._step(fut)
        return None

    def _made(self, conn: PipeConn) -> None:
        """The attempt's connection is made (its `connection_made`): the connect is over, `done` is
        called now. The coroutine waits for its transport's waiter, which uvloop (asyncio a callback
        later) sets only once `connection_made` has returned: its callback is taken off (no loop
        turn and callback handle for it) and the connection runs the coroutine to its end
        (`_finish`) at its next callback, which is always after that. Not when the wait is over
        already (the deadline cancelled it: `_step` sees that)."""
        fut = self.fut
        if conn is not self.conn or fut is None or fut.done():
            return
        fut.remove_done_callback(self)
        self.made = True
        self._disarm()
        self.conn = None
        self.done(conn, None)  # TCP_NODELAY: set on every TCP transport by uvloop and asyncio alike

    def _finish(self) -> None:
        """The coroutine of a connect already `_made`, run to its end: it gives the transport and the
        protocol (as `done` was given them); anything else means the connection has failed or closed
        since, which its own callbacks tell. A waiter not set yet (not seen) is waited for."""
        coro = self.coro
        if coro is None:
            return
        fut = self.fut
        if fut is not None and not fut.done():
            fut.add_done_callback(self)  # (`__call__`: `_finish` again)
            return
        self.coro = self.fut = None
        try:
            coro.send(None)
        except BaseException:  # (StopIteration: its end)
            pass

    def _disarm(self) -> None:
        timer = self.timer
        if timer is None:
            deadlines = _DEADLINES
            deadlines.waiting.pop(self, None)
        else:
            timer.cancel()

    def _step(self, _fut: Any) -> None:
        """Go on with the connecting coroutine (what its task's step would do)."""
        self.fut = None
        connected = False
        try:
            fut = self.coro.send(None)
        except StopIteration:
            # Connected (its value: the transport and `self.conn`). Nothing in this clause may raise:
            # compiled, a clause that can raise gets the exception fetched and given a traceback.
            connected = True
        except (asyncio.CancelledError, OSError) as exc:
            self._disarm()
            if self.conn is not None:
                self.conn.connecting = None
            self.coro = self.conn = None
            host, port = self.host, self.port
            if isinstance(exc, asyncio.CancelledError):
                failure = UpstreamFailure("timeout", f"connecting to {host}:{port} timed out")
            else:
                failure = _failure(exc, host, port)
            if self.i < len(self.addrs):
                self._try()
                return
            if self.cached and failure.kind not in ("guard", "timeout"):
                forget(host, port)  # every cached address failed: the name may have moved
                self.done(None, None)
                return
            self.done(None, failure)
            return
        except BaseException:
            self._disarm()
            if self.conn is not None:
                self.conn.connecting = None
            self.coro = self.conn = None
            raise
        if connected:  # (without `_made`: a loop that did not call `connection_made` first)
            self._disarm()
            conn, self.coro, self.conn = self.conn, None, None
            if conn is not None:
                conn.connecting = None
            self.done(conn, None)  # TCP_NODELAY: set on every TCP transport by uvloop and asyncio alike
            return
        fut._asyncio_future_blocking = False
        self.fut = fut
        fut.add_done_callback(self)  # (`__call__`: `_step`; no bound method made)

    def _expire(self) -> None:
        """The deadline: the pending connect is cancelled (as `_Deadline` cancels the task)."""
        self.fired = True
        fut = self.fut
        if fut is not None and not fut.done():
            fut.cancel()  # its callback goes on with the coroutine, which sees the cancellation


class _ConnectDeadlines(FirstDeadlines):
    """The deadlines of the connects in flight (`Connecting`): one timer for them all
    (`FirstDeadlines`). They wait with the same timeout (`connectTimeout`), so the order they start in
    is their deadlines' order. One event loop's at a time: a connect on another loop while this one's
    are in flight (threads), a shorter timeout than those waiting, or a second address of one
    connect out of order, arms a timer of its own; the connects of a loop that closed (nothing will
    finish them) are dropped when the next loop's first one comes."""

    __slots__ = ()

    def arm(self, c: Connecting) -> bool:
        """Queue `c`'s deadline (`c._expire` is called once it has come); False: not queued."""
        return self.queue(c, c.loop, c.deadline)

    def expire(self, c: Connecting) -> None:
        c._expire()


_DEADLINES = _ConnectDeadlines()
