"""What the listeners share: the `proxy:` limits, the `ProxyContext` (gate, caps, recorder, request
hooks, upstream pool, tunnel hook) and `ClientConn`, an accepted client connection counted
against the connection caps. `start_listener` serves a handler (`http_proxy.handle_http`,
`socks5_proxy.handle_socks`) on a port; a listener may begin its connections in their callbacks
(`http_proxy.begin_http`), the handler's task starting only when that hands a connection over.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from greyproxy.compiled import slotted

from .conn import Conn, ConnClosed
from .docker_identity import DockerIdentity
from .gate import Gate, Verdict
from .hooks import HookChain
from .identities import IdentityGuard
from .pipeline import Recorder
from .pool import UpstreamPool

log = logging.getLogger("greyproxy.proxy")


@dataclass
class Limits:
    """The `proxy:` config section's connection limits (docs/configuration.md)."""

    header_timeout: float = 30.0  # a request head (or the SOCKS5 handshake) in full, from its first byte
    connect_timeout: float = 10.0
    idle_timeout: float = 600.0
    max_header_bytes: int = 65536
    max_headers: int = 100
    max_connections: int = 10000
    max_per_client: int = 1000
    upstream_pool_size: int = 32  # idle upstream connections kept per (client, destination); 0: none
    upstream_idle_timeout: float = 30.0
    half_closed_clients: bool = False  # a client's EOF while its answer is awaited: still answer it
    # proxy.workers > 1: the caps above are this worker's share (⌈cap / workers⌉) of the configured ones
    workers: int = 1
    configured_max_connections: int = 0  # (0: as max_connections)
    configured_max_per_client: int = 0  # (0: as max_per_client)

    @property
    def upstream_pool_total(self) -> int:
        """Idle upstream connections kept overall (descriptors held with no client attached)."""
        return max(0, self.upstream_pool_size) * 16


# Called after a CONNECT/SOCKS tunnel is allowed and connected, before piping. Returns True when it
# took the connection over (HTTPS interception); None/False → plain tunnel. Set by later capabilities.
# A hook may also answer without waiting (`first_look`, mitm.Interceptor's): the HTTP listener's new
# tunnels are then looked at from their connections' callbacks, the hook awaited only when it says so.
TunnelHook = Callable[["ProxyContext", Conn, Conn, str, str, int, Verdict, str], Awaitable[bool]]


# Names of the caps, as they appear in refusals, logs and stats (the config keys).
CAP_OVERALL = "maxConnections"
CAP_PER_CLIENT = "maxConnectionsPerClient"


class ProxyContext:
    """What both listeners share.

    Connection counting: `active` counts every open client connection of both listeners from
    accept to close. A connection counts for its client identity (`per_client`) from the moment
    the identity is known (its first request head, or the end of the SOCKS5 handshake) until it
    closes; a connection that has not said who it is yet is bounded by the header deadline and the
    overall cap only. Refusals are answered in the protocol (503/429, SOCKS5 general failure).
    """

    # (context.pxd: an extension type when compiled; keep these equal to its attributes)
    __slots__ = (
        "gate",
        "limits",
        "active",
        "per_client",
        "refused",
        "tunnel_hook",
        "hooks",
        "recorder",
        "pool",
        "docker",
        "identities",
        "deadlines",
        "idle_sweeper",
        "_refusal_logged",
        "loop",
    )

    def __init__(self, gate: Gate, limits: Limits) -> None:
        # (imported here: keepalive.py and tunnel.py read this module's extension types, compiled,
        # so they import it when they are imported; it must not import them first)
        from .keepalive import Deadlines
        from .tunnel import IdleSweeper

        self.gate = gate
        self.limits = limits
        self.active = 0
        self.per_client: dict[str, int] = {}
        self.refused: dict[str, int] = {CAP_OVERALL: 0, CAP_PER_CLIENT: 0}
        self.tunnel_hook: TunnelHook | None = None
        # The request hooks every proxied HTTP request passes (hooks.py); the service installs the chain.
        self.hooks = HookChain()
        # Transaction records of plain-HTTP forward-proxy requests (the same recorder as interception's;
        # set by the service, None = not recorded).
        self.recorder: Recorder | None = None
        # Idle upstream connections of the forward proxy, per (client identity, host, port).
        self.pool = UpstreamPool(
            per_key=limits.upstream_pool_size,
            total=limits.upstream_pool_total,
            idle_timeout=limits.upstream_idle_timeout,
        )
        # Container names from the Docker/Podman engine (greyproxy.docker.enabled); None = off.
        self.docker: DockerIdentity | None = None
        # Claimed identities (SPEC §16); None = every name is taken at its word (as before).
        self.identities: IdentityGuard | None = None
        # The HTTP proxy's request cycles' deadlines (keepalive.py).
        self.deadlines = Deadlines()
        # The spliced tunnels, closed once idle for limits.idle_timeout (tunnel.py).
        self.idle_sweeper = IdleSweeper(limits.idle_timeout)
        self._refusal_logged = 0.0
        # The listeners' event loop, looked up once (asyncio.get_running_loop() costs a getpid()
        # system call; every accepted connection needs the loop for its task).
        self.loop: asyncio.AbstractEventLoop | None = None

    def note_refusal(self, cap: str, identity: str) -> None:
        self.refused[cap] += 1
        now = asyncio.get_running_loop().time()
        if now - self._refusal_logged >= 1.0:  # at most one line a second under a flood
            self._refusal_logged = now
            log.warning(
                "connection cap %s reached: refusing %s (%d active; refused so far: %s)",
                cap,
                identity,
                self.active,
                self.refused,
            )

    def stats(self) -> dict[str, object]:
        return {
            "active_connections": self.active,
            "clients": len(self.per_client),
            "refused_connections": dict(self.refused),
            "upstream_pool": self.pool.stats(),
        }


class ClientConn(Conn):
    """An accepted client connection: starts its handler task once connected, or `begin` runs it in its
    callbacks until it needs the handler (then `start`)."""

    __slots__ = (
        "handler",
        "begin",
        "cycle",
        "ctx",
        "task",
        "src_ip",
        "identity",
        "over_cap",
        "claimed",
        "identity_token",
        "counted",
        "detached",
        "_gone_fut",
    )

    def __init__(
        self,
        ctx: ProxyContext,
        handler: Callable[["ClientConn"], Awaitable[None]],
        begin: Callable[["ClientConn"], None] | None = None,
    ) -> None:
        self._setup()  # Conn's attributes (not super(): a super object and its MRO walk per accepted connection)
        self.client_side = True
        self.ctx = ctx
        self.handler = handler
        # Called once connected instead of starting the handler's task: it serves the connection in
        # its callbacks and calls `start` when the handler must go on (the HTTP proxy's first request).
        self.begin = begin
        self.cycle: Any = None  # what `begin` set up, for the handler to take over (keepalive.KeptAlive)
        self.task: asyncio.Task | None = None
        self.src_ip = ""
        self.identity: str | None = None  # the client identity this connection is counted for
        self.over_cap = False  # accepted past maxConnections: refused once its request is read
        # SPEC §16: True when the connection's identity is a claimed name whose secret it presented
        # (hooks see it as Flow.claimed: what a session bound to a claimed identity keys on).
        self.claimed = False
        self.identity_token: tuple[int, str, bytes | None] | None = None  # the identity check this connection passed
        self.counted = False  # in ctx.active (from accept until `finish`)
        # Outlives its handler's task: a spliced tunnel (tunnel.py) calls `finish` once both ends closed.
        self.detached = False
        self._gone_fut: asyncio.Future | None = None  # made by `gone` (a hold only)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Conn.connection_made(self, transport)
        # (`peername`'s address, without the port's conversion and the tuple it builds)
        info = transport.get_extra_info("peername")
        self.src_ip = str(info[0]) if info else ""
        ctx = self.ctx
        cap = ctx.limits.max_connections
        # Past the cap a connection is still read (so it gets a 503 / SOCKS5 failure it can
        # understand); past the cap plus a margin it is dropped at once, to keep descriptors bounded.
        if ctx.active >= cap + max(64, cap // 10):
            ctx.note_refusal(CAP_OVERALL, f"unknown-{self.src_ip}")
            transport.abort()  # type: ignore[attr-defined]
            return
        self.over_cap = ctx.active >= cap
        ctx.active += 1
        self.counted = True
        loop = ctx.loop
        if loop is None:
            loop = ctx.loop = asyncio.get_running_loop()
        self._loop = loop
        if self.begin is not None:
            self.begin(self)
        else:
            self.task = loop.create_task(self._run())

    def start(self) -> None:
        """The handler's task, for a connection `begin` took: it goes on where that left it."""
        self.task = (self._loop or self._bind_loop()).create_task(self._run())

    def claim(self, identity: str) -> str | None:
        """Count this connection for `identity`. The name of the cap that refuses it, or None."""
        ctx = self.ctx
        if self.over_cap:
            ctx.note_refusal(CAP_OVERALL, identity)
            return CAP_OVERALL
        if identity == self.identity:
            return None
        if ctx.per_client.get(identity, 0) >= ctx.limits.max_per_client:
            ctx.note_refusal(CAP_PER_CLIENT, identity)
            return CAP_PER_CLIENT
        self._release()
        self.identity = identity
        ctx.per_client[identity] = ctx.per_client.get(identity, 0) + 1
        return None

    def _release(self) -> None:
        if self.identity is None:
            return
        per_client = self.ctx.per_client
        n = per_client.get(self.identity, 1) - 1
        if n <= 0:
            per_client.pop(self.identity, None)
        else:
            per_client[self.identity] = n
        self.identity = None

    async def _run(self) -> None:
        try:
            await self.handler(self)
        except (ConnClosed, ConnectionError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("connection handler failed")
        finally:
            if not self.detached:
                self.finish()

    def finish(self) -> None:
        """Done with this connection: no longer counted against the caps (once), and closed."""
        if self.counted:
            self.counted = False
            self.ctx.active -= 1
            self._release()
        self.close()

    def gone(self) -> asyncio.Future:
        """A future that completes when the client disconnects or ends its sending side (ends a hold
        early). A held client has had no answer yet: its FIN is what curl --max-time, requests'
        and httpx's timeouts send when they give up (a reset is rare), so it counts as gone, as
        nginx counts a client's close while its request waits upstream."""
        fut = self._gone_fut
        if fut is None:
            fut = self._gone_fut = (self._loop or self._bind_loop()).create_future()
            if self.closed or self.eof:
                fut.set_result(None)
        return fut

    def _left(self) -> None:
        fut = self._gone_fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def eof_received(self) -> bool:
        keep_open = Conn.eof_received(self)
        self._left()
        return keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        Conn.connection_lost(self, exc)
        self._left()


def default_identity(conn: ClientConn) -> str:
    """`unknown-<client address>`: one string per address (bounded), so the dicts every request looks
    its identity up in (caps, upstream pool, gate) compare it by reference and never hash it again."""
    ip = conn.src_ip
    names = _DEFAULT_NAMES
    name = names.get(ip)
    if name is None:
        name = f"unknown-{ip}"
        if len(names) >= 4096:
            names.clear()  # (addresses come from clients: bounded, start over)
        names[ip] = name
    return name


_DEFAULT_NAMES: dict[str, str] = {}  # client address -> its default identity (`default_identity`)


async def unnamed_identity(conn: ClientConn) -> str:
    """The identity of a connection that gave no proxy user name: its container's name when the
    engine knows its address (greyproxy.docker), else unknown-<ip>."""
    docker = conn.ctx.docker
    if docker is not None:
        found = await docker.lookup(conn.src_ip)
        if found is not None:
            conn.ctx.gate.container_ids[found[0]] = found[1]
            return found[0]
    return default_identity(conn)


# Seconds a new connection may stay silent before it is accepted anyway (TCP_DEFER_ACCEPT, Linux): the
# proxy's clients always speak first (an HTTP request head, a SOCKS5 greeting), so the kernel hands
# a connection over only once its first bytes are there, and accepting it and reading them take one
# wakeup of the event loop instead of two. A client that says nothing is accepted after this long
# (the kernel's SYN-ACK retransmission schedule rounds it up: 1 s, 3 s, 7 s...) and meets
# headerTimeout from then; one that connects and closes is accepted at once. 0: accept at once.
DEFER_ACCEPT = 1


def defer_accept(server: asyncio.Server, seconds: float) -> bool:
    """TCP_DEFER_ACCEPT on the server's listening sockets (`seconds` > 0); whether it was set on them
    (False: off, or not on this platform)."""
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is None or seconds <= 0:
        return False
    done = True
    for sock in server.sockets:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, max(1, round(seconds)))
        except OSError as exc:
            log.warning("TCP_DEFER_ACCEPT not set on %s: %s", sock.getsockname(), exc)
            done = False
    return done


async def start_listener(
    ctx: ProxyContext,
    host: str,
    port: int,
    handler,
    reuse_port: bool = False,
    begin: Callable[[ClientConn], None] | None = None,
    defer: float = DEFER_ACCEPT,
) -> asyncio.AbstractServer:
    """Serve `handler` on (host, port); `begin`: how a connection starts (see `ClientConn`); `defer`:
    TCP_DEFER_ACCEPT's seconds (`DEFER_ACCEPT`; 0: off)."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        # (the type called with its arguments bound: no function of ours called per accepted connection)
        functools.partial(ClientConn, ctx, handler, begin),  # type: ignore[arg-type]  # (a protocol by duck typing, conn.Conn)
        host,
        port,
        reuse_address=True,
        backlog=2048,
        reuse_port=reuse_port or None,
    )
    defer_accept(server, defer)
    return server


slotted(globals(), "Limits")  # (as Python: __slots__, as http1's heads; compiled, an extension type: context.pxd)
