"""Tunnels (CONNECT and SOCKS5): an allowed, connected pair of connections handed to the tunnel
hook (HTTPS interception) or spliced both ways, closed when idle or when its rule goes away.
"""

from __future__ import annotations

import asyncio
import logging

from .conn import Conn, splice
from .context import ProxyContext
from .gate import Verdict

log = logging.getLogger("greyproxy.proxy")


async def run_tunnel(
    ctx: ProxyContext, client: Conn, upstream: Conn, container: str, host: str, port: int, verdict: Verdict, method: str
) -> None:
    """Pipe both ways until both sides are closed; closed early if the allowing rule goes away."""
    gate = ctx.gate

    def close_both() -> None:
        client.abort()
        upstream.abort()

    cid = gate.track(container, host, port, verdict, close_both)
    loop = asyncio.get_running_loop()
    quiet_since, seen = loop.time(), client.bytes_in + upstream.bytes_in
    try:
        if ctx.tunnel_hook is not None and await ctx.tunnel_hook(
            ctx, client, upstream, container, host, port, verdict, method
        ):
            return
        splice(client, upstream)
        if client.bytes_in + upstream.bytes_in != seen:
            quiet_since = loop.time()
        watch = IdleWatch(client, upstream, ctx.limits.idle_timeout, quiet_since)
        try:
            # One after the other, in this task (gather would wrap each in a task of its own).
            await client.wait_closed()
            await upstream.wait_closed()
        finally:
            watch.cancel()
    finally:
        gate.finish_log(verdict)  # the hook writes it with its mitm_skip_reason; a plain tunnel here
        gate.untrack(cid)
        client.close()
        upstream.close()


class IdleWatch:
    """Closes a spliced tunnel once no byte has passed either way for `idle` seconds.

    One timer per tunnel, checked every idle/4: the relay itself stays free of per-chunk work
    (it only bumps `bytes_in`), and a tunnel is closed between idle and 1.25 x idle after its last byte.
    """

    __slots__ = ("a", "b", "idle", "step", "seen", "since", "handle")

    def __init__(self, a: Conn, b: Conn, idle: float, since: float) -> None:
        self.a, self.b, self.idle = a, b, idle
        self.step = max(idle / 4, 0.05)
        self.seen = a.bytes_in + b.bytes_in
        self.since = since
        self.handle: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(self.step, self._check)

    def _check(self) -> None:
        now = asyncio.get_running_loop().time()
        total = self.a.bytes_in + self.b.bytes_in
        if total != self.seen:
            self.seen, self.since = total, now
        elif now - self.since >= self.idle:
            log.info("closing a tunnel idle for %.0f s", now - self.since)
            self.handle = None
            self.a.close()
            self.b.close()
            return
        self.handle = asyncio.get_running_loop().call_later(self.step, self._check)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
