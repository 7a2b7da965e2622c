"""Tunnels (CONNECT and SOCKS5): an allowed, connected pair of connections handed to the tunnel
hook (HTTPS interception) or spliced both ways, closed when idle or when its rule goes away.

A spliced tunnel needs no task: once `splice()` has joined the two connections the handler's task
ends, and the tunnel is finished (untracked, its client connection no longer counted) by the
second of its two `connection_lost` callbacks. One timer per `IdleSweeper` (one per listener
context) closes the tunnels where no byte has passed either way for `idleTimeout`.
"""

from __future__ import annotations

import asyncio
import logging
from time import monotonic
from typing import TYPE_CHECKING

from .conn import Conn, splice
from .gate import Verdict

if TYPE_CHECKING:
    from .context import ClientConn, ProxyContext

log = logging.getLogger("greyproxy.proxy")


class Tunnel:
    """One tunnel from its admission to the close of both its connections."""

    __slots__ = ("ctx", "client", "upstream", "cid", "seen", "since", "ended")

    def __init__(self, ctx: ProxyContext, client: ClientConn, upstream: Conn) -> None:
        self.ctx, self.client, self.upstream = ctx, client, upstream
        self.cid = 0
        self.seen = 0  # bytes both ways when the sweeper last saw them change
        self.since = 0.0  # when that changed (time.monotonic; or the start: a tunnel where nobody speaks)
        self.ended = False

    def track(self, container: str, host: str, port: int, verdict: Verdict) -> None:
        """Tracked by the gate (closed when its rule goes away) from now; the bytes seen so far."""
        client, upstream = self.client, self.upstream
        gate = self.ctx.gate  # (compiled: a Gate's, its track a C call; tunnel.pxd)
        self.cid = gate.track(container, host, port, verdict, self.abort)
        self.seen, self.since = client.bytes_in + upstream.bytes_in, monotonic()

    def join(self) -> None:
        """Splice both ways: from now on the tunnel lives in its connections' callbacks, watched by
        the idle sweeper (its idle time counted from the last byte seen, else from `track`)."""
        client, upstream = self.client, self.upstream
        splice(client, upstream)
        total = client.bytes_in + upstream.bytes_in
        if total != self.seen:
            self.seen, self.since = total, monotonic()
        client.detached = True
        client.on_close = upstream.on_close = self  # (`__call__`: no bound method made per tunnel)
        sweeper = self.ctx.idle_sweeper  # (compiled: an IdleSweeper's, a C call; tunnel.pxd)
        sweeper.add(self)
        self._lost()  # both ends may be closed already

    def abort(self) -> None:
        """Close both ends at once (its rule went away, its identity was rotated)."""
        self.client.abort()
        self.upstream.abort()

    def __call__(self) -> None:
        """Its connections' `on_close`: `_lost`."""
        self._lost()

    def _lost(self) -> None:
        """A connection's connection_lost: the tunnel is over once both are closed."""
        if self.client.closed and self.upstream.closed:
            self.end()

    def end(self) -> None:
        """Once: forget the tunnel, close what is still open, stop counting its client connection."""
        if self.ended:
            return
        self.ended = True
        ctx = self.ctx
        sweeper, gate = ctx.idle_sweeper, ctx.gate
        sweeper.discard(self)
        gate.untrack(self.cid)
        client = self.client  # (compiled: a ClientConn, its `finish` a C call; tunnel.pxd)
        client.on_close = self.upstream.on_close = None
        self.upstream.close()
        client.finish()


async def run_tunnel(
    ctx: ProxyContext,
    client: ClientConn,
    upstream: Conn,
    container: str,
    host: str,
    port: int,
    verdict: Verdict,
    method: str,
    tunnel: Tunnel | None = None,
) -> None:
    """Hand the pair to the tunnel hook, else splice it both ways and return at once: the tunnel
    lives on without a task until both ends are closed (idle ones are closed by the sweeper; a
    tunnel whose rule goes away is closed by the gate). `tunnel`: the pair's, tracked already (its
    first bytes looked at from the callbacks, keepalive.py)."""
    gate = ctx.gate
    if tunnel is None:
        tunnel = Tunnel(ctx, client, upstream)
        tunnel.track(container, host, port, verdict)
    spliced = False
    try:
        hook = ctx.tunnel_hook
        if hook is not None and await hook(ctx, client, upstream, container, host, port, verdict, method):
            return
        gate.finish_log(verdict)  # the hook wrote it with its mitm_skip_reason; a plain tunnel here
        tunnel.join()
        spliced = True
    finally:
        if not spliced:
            gate.finish_log(verdict)
            gate.untrack(tunnel.cid)
            client.close()
            upstream.close()


class IdleSweeper:
    """Closes spliced tunnels once no byte has passed either way for `idle` seconds.

    One timer for all of them, every idle/4 while there are any: the relay itself stays free of
    per-chunk work (it only bumps `bytes_in`), a tunnel costs no timer of its own, and a tunnel is
    closed between idle and 1.25 x idle after its last byte (a tunnel where nobody ever spoke:
    after its start).
    """

    __slots__ = ("idle", "step", "tunnels", "_timer", "_loop")

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self.step = max(idle / 4, 0.05)
        self.tunnels: dict[Tunnel, None] = {}  # in the order they started
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self.tunnels)

    def add(self, tunnel: Tunnel) -> None:
        self.tunnels[tunnel] = None
        if self._timer is None:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.step, self._sweep)

    def discard(self, tunnel: Tunnel) -> None:
        self.tunnels.pop(tunnel, None)

    def _sweep(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None
        now = monotonic()
        idle = []
        for t in self.tunnels:
            total = t.client.bytes_in + t.upstream.bytes_in
            if total != t.seen:
                t.seen, t.since = total, now
            elif now - t.since >= self.idle:
                idle.append(t)
        for t in idle:
            log.info("closing a tunnel idle for %.0f s", now - t.since)
            self.tunnels.pop(t, None)
            t.client.close()
            t.upstream.close()
        if self.tunnels:
            self._timer = loop.call_later(self.step, self._sweep)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
