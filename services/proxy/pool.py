"""Idle upstream connections of the HTTP forward proxy, kept for the next request.

A plain-HTTP client that opens a new connection per request (many scripts and SDKs do) would
otherwise cost the proxy, and the origin, a TCP connect and close for every request. Upstream
connections that ended an exchange cleanly are parked here and handed to the next request for the
same destination **from the same client identity**: connections are never shared between
identities, so connection-bound state at an origin (a login tied to a connection, NTLM) cannot
leak from one client to another. Each request is still judged by the rules before a connection
is taken from here, and the connection's address is judged again for that request's admission
(an address rule added since it was parked refuses it: it is closed, and a fresh connect is judged;
`Gate.keeps`, which also judges an upstream kept on a client's connection before its next request).

Bounded: at most `per_key` idle connections per (identity, host, port) and `total` overall (the
oldest goes first); a parked connection is closed after `idle_timeout` seconds. One that the
origin closed, or that received unsolicited bytes while parked, is never handed out.
"""

from __future__ import annotations

import asyncio
from collections import deque
from time import monotonic
from typing import TYPE_CHECKING

from .conn import Conn

if TYPE_CHECKING:
    from .gate import Admission, Gate

Key = tuple[str, str, int]  # (client identity, host, port)


class UpstreamPool:
    # (pool.pxd: an extension type when compiled; keep these equal to its attributes)
    __slots__ = ("per_key", "total", "idle_timeout", "_idle", "_count", "_sweeper", "reused", "parked", "_last")

    def __init__(self, per_key: int = 32, total: int = 512, idle_timeout: float = 30.0) -> None:
        self.per_key = per_key
        self.total = total
        self.idle_timeout = idle_timeout
        # Least recently parked first: a plain dict keeps its keys in the order they were (re)inserted,
        # and its look-ups, insertions and deletions cost about half an OrderedDict's (a new
        # connection's request takes its key's last connection, which deletes the key, and parks it again).
        self._idle: dict[Key, deque[tuple[float, Conn]]] = {}
        self._count = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self.reused = 0
        self.parked = 0
        # The key parked last: while it is in `_idle` it is its last key (only `put` inserts), so parking
        # for it again (a client that opens a connection per request) need not move it to the end.
        self._last: Key | None = None

    @property
    def enabled(self) -> bool:
        return self.per_key > 0 and self.total > 0

    def __len__(self) -> int:
        return self._count

    def get(self, key: Key, admission: Admission) -> Conn | None:
        """A live idle connection for `key` (most recently parked first) that `admission` (the new
        request's, for the same client and destination) keeps: its address judged again by the rules
        as they are now (`Admission.keeps`); or None. One it refuses is closed."""
        return self.take(key, admission.gate)

    def take(self, key: Key, gate: Gate) -> Conn | None:
        """`get` for a new request of `key`'s client to its destination, judged by `gate` (`Gate.keeps`,
        what its admission's `keeps` asks), without an `Admission` made for it."""
        q = self._idle.get(key)
        while q:
            _t, conn = q.pop()
            self._count -= 1
            if usable(conn) and gate.keeps(key[0], key[2], conn):
                # (an emptied queue stays, for the key's next `put`: most often this connection's, as
                # its client's connection ends; `_sweep` drops the ones left empty)
                self.reused += 1
                return conn
            conn.abort()
        return None

    def put(self, key: Key, conn: Conn) -> None:
        """Park a connection whose last exchange ended cleanly; closes it instead when it cannot be kept."""
        if self.per_key <= 0 or self.total <= 0 or not usable(conn):  # (`enabled`, inline)
            conn.close()
            return
        idle = self._idle
        q = idle.get(key) if key == self._last else None  # (at the end already)
        if q is None:
            q = idle.pop(key, None)
            if q is None:
                q = deque()
            idle[key] = q  # (at the end: the most recently parked)
            self._last = key
        if len(q) >= self.per_key:
            self._close_oldest(q)
        q.append((monotonic(), conn))
        self._count += 1
        self.parked += 1
        while self._count > self.total:
            self._drop_oldest()
        if self._sweeper is None:
            # The connection's loop (asyncio.get_running_loop() costs a getpid() system call in CPython
            # 3.11, and this runs once per plain-HTTP client connection that ends).
            loop = conn._loop or conn._bind_loop()
            self._sweeper = loop.call_later(max(self.idle_timeout / 4, 0.05), self._sweep)

    def _close_oldest(self, q: deque[tuple[float, Conn]]) -> None:
        q.popleft()[1].close()
        self._count -= 1

    def _drop_oldest(self) -> None:
        idle = self._idle
        while True:
            key, q = next(iter(idle.items()))
            if q:
                break
            del idle[key]  # (left empty by `take`)
        self._close_oldest(q)
        if not q:
            del idle[key]

    def _sweep(self) -> None:
        self._sweeper = None
        loop = asyncio.get_running_loop()
        cutoff = monotonic() - self.idle_timeout  # (the clock of the parking times: `put`)
        for key in list(self._idle):
            q = self._idle[key]
            while q and (q[0][0] <= cutoff or not usable(q[0][1])):
                self._close_oldest(q)
            # Anything dead further back goes at the next get() or sweep.
            if not q:
                del self._idle[key]
        if self._count:
            self._sweeper = loop.call_later(max(self.idle_timeout / 4, 0.05), self._sweep)

    def close_all(self) -> None:
        for q in self._idle.values():
            for _t, conn in q:
                conn.close()
        self._idle.clear()
        self._count = 0
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def stats(self) -> dict[str, int]:
        return {"idle": self._count, "reused": self.reused, "parked": self.parked}


def usable(conn: Conn) -> bool:
    """Open, not half-closed by the origin, and nothing unread (an idle origin has nothing to say)."""
    return (
        not conn.closed
        and not conn.eof
        and not conn.buf
        and conn.transport is not None
        and not conn.transport.is_closing()
    )
