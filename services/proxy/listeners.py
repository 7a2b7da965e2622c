"""The HTTP and SOCKS5 listeners: protocol I/O around the sans-I/O parsers and the gate."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from . import http1, socks5
from .conn import Conn, ConnClosed, splice
from .docker_identity import DockerIdentity
from .gate import Gate, Verdict
from .pipeline import Recorder, Txn, relay, substitute_credentials
from .pool import UpstreamPool, usable
from .upstream import UpstreamFailure, connect

log = logging.getLogger("greyproxy.proxy")

FORBIDDEN_BODY = b"Blocked by Greyproxy: this destination is not allowed\n"


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

    @property
    def upstream_pool_total(self) -> int:
        """Idle upstream connections kept overall (descriptors held with no client attached)."""
        return max(0, self.upstream_pool_size) * 16


# Called after a CONNECT/SOCKS tunnel is allowed and connected, before piping. Returns True when it
# took the connection over (HTTPS interception); None/False → plain tunnel. Set by later capabilities.
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

    def __init__(self, gate: Gate, limits: Limits) -> None:
        self.gate = gate
        self.limits = limits
        self.active = 0
        self.per_client: dict[str, int] = {}
        self.refused: dict[str, int] = {CAP_OVERALL: 0, CAP_PER_CLIENT: 0}
        self.tunnel_hook: TunnelHook | None = None
        # Transaction records of plain-HTTP forward-proxy requests (the same recorder as interception's;
        # set by the service, None = not recorded).
        self.recorder: Recorder | None = None
        # Idle upstream connections of the forward proxy, per (client identity, host, port).
        self.pool = UpstreamPool(per_key=limits.upstream_pool_size, total=limits.upstream_pool_total,
                                 idle_timeout=limits.upstream_idle_timeout)
        # Container names from the Docker/Podman engine (greyproxy.docker.enabled); None = off.
        self.docker: DockerIdentity | None = None
        self._refusal_logged = 0.0

    def guard(self, ip: str, port: int) -> bool:
        return self.gate.is_own_listener(ip, port)

    def note_refusal(self, cap: str, identity: str) -> None:
        self.refused[cap] += 1
        now = asyncio.get_running_loop().time()
        if now - self._refusal_logged >= 1.0:  # at most one line a second under a flood
            self._refusal_logged = now
            log.warning("connection cap %s reached: refusing %s (%d active; refused so far: %s)",
                        cap, identity, self.active, self.refused)

    def stats(self) -> dict[str, object]:
        return {"active_connections": self.active, "clients": len(self.per_client),
                "refused_connections": dict(self.refused), "upstream_pool": self.pool.stats()}


class ClientConn(Conn):
    """An accepted client connection: starts its handler task once connected."""

    KIND = "client"
    __slots__ = ("handler", "ctx", "task", "src_ip", "identity", "over_cap")

    def __init__(self, ctx: ProxyContext, handler: Callable[["ClientConn"], Awaitable[None]]) -> None:
        super().__init__()
        self.ctx = ctx
        self.handler = handler
        self.task: asyncio.Task | None = None
        self.src_ip = ""
        self.identity: str | None = None  # the client identity this connection is counted for
        self.over_cap = False  # accepted past maxConnections: refused once its request is read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.src_ip = self.peername()[0]
        ctx, limits = self.ctx, self.ctx.limits
        # Past the cap a connection is still read (so it gets a 503 / SOCKS5 failure it can
        # understand); past the cap plus a margin it is dropped at once, to keep descriptors bounded.
        if ctx.active >= limits.max_connections + max(64, limits.max_connections // 10):
            ctx.note_refusal(CAP_OVERALL, f"unknown-{self.src_ip}")
            transport.abort()  # type: ignore[attr-defined]
            return
        self.over_cap = ctx.active >= limits.max_connections
        ctx.active += 1
        self.task = asyncio.ensure_future(self._run())

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
            self.ctx.active -= 1
            self._release()
            self.close()

    def gone(self) -> asyncio.Future:
        """A future that completes when the client disconnects (ends a hold early)."""
        if self._closed_fut is None:
            self._closed_fut = asyncio.get_running_loop().create_future()
            if self.closed:
                self._closed_fut.set_result(None)
        return self._closed_fut


def default_identity(conn: ClientConn) -> str:
    return f"unknown-{conn.src_ip}"


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


async def _tunnel(ctx: ProxyContext, client: Conn, upstream: Conn, container: str, host: str, port: int,
                  verdict: Verdict, method: str) -> None:
    """Pipe both ways until both sides are closed; closed early if the allowing rule goes away."""
    gate = ctx.gate

    def close_both() -> None:
        client.abort()
        upstream.abort()

    cid = gate.track(container, host, port, verdict, close_both)
    loop = asyncio.get_running_loop()
    quiet_since, seen = loop.time(), client.bytes_in + upstream.bytes_in
    try:
        if ctx.tunnel_hook is not None and await ctx.tunnel_hook(ctx, client, upstream, container, host, port,
                                                                 verdict, method):
            return
        splice(client, upstream)
        if client.bytes_in + upstream.bytes_in != seen:
            quiet_since = loop.time()
        watch = _IdleWatch(client, upstream, ctx.limits.idle_timeout, quiet_since)
        try:
            await asyncio.gather(client.wait_closed(), upstream.wait_closed())
        finally:
            watch.cancel()
    finally:
        gate.finish_log(verdict)  # the hook writes it with its mitm_skip_reason; a plain tunnel here
        gate.untrack(cid)
        client.close()
        upstream.close()


class _IdleWatch:
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


# ---------------------------------------------------------------- HTTP proxy

async def _read_head(conn: Conn, limits: Limits, parse: Callable, first_timeout: float | None):
    """Read until a full head parses. None when the peer closed cleanly before sending anything.

    Without `first_timeout` (a client's first request) the whole head must arrive within the header
    deadline, counted from now. With it (the next request on a kept-alive connection, or a response),
    the first byte may take up to `first_timeout`, and the header deadline runs from that byte.
    """
    loop = asyncio.get_running_loop()
    now = loop.time()
    deadline = now + limits.header_timeout if first_timeout is None or conn.buf else None
    idle_deadline = now + first_timeout if first_timeout is not None else None
    while True:
        if conn.buf:
            if deadline is None:
                deadline = loop.time() + limits.header_timeout
            parsed = parse(bytes(conn.buf))
            if parsed is not None:
                return parsed
        remaining = (deadline if deadline is not None else idle_deadline) - loop.time()  # type: ignore[operator]
        if remaining <= 0:
            raise asyncio.TimeoutError()
        if not await conn.read_more(remaining):
            if conn.buf:
                raise http1.HttpError(400, "incomplete request")
            return None


def _error_response(status: int, reason: str, text: str) -> bytes:
    return http1.render_response(status, reason, (text.rstrip("\n") + "\n").encode(), close=True)


def _cap_response(cap: str, identity: str, limits: Limits) -> bytes:
    """The refusal of a connection past a connection cap: 503 (overall) or 429 (this client)."""
    if cap == CAP_OVERALL:
        status, reason = 503, "Service Unavailable"
        text = (f"Greyproxy: too many open connections (proxy.{CAP_OVERALL} = {limits.max_connections}); "
                "try again later\n")
    else:
        status, reason = 429, "Too Many Requests"
        text = (f"Greyproxy: too many open connections for client {identity!r} "
                f"(proxy.{CAP_PER_CLIENT} = {limits.max_per_client}); close some and try again\n")
    return http1.render_response(status, reason, text.encode("utf-8"), headers=[("Retry-After", "1")], close=True)


def _upstream_error(exc: UpstreamFailure) -> tuple[int, str, str]:
    """(status, reason, text) of the answer to a failed upstream connect."""
    if exc.kind == "guard":
        return 403, "Forbidden", "Blocked by Greyproxy: that is this proxy's own listener"
    if exc.kind == "timeout":
        return 504, "Gateway Timeout", f"Greyproxy: {exc}"
    return 502, "Bad Gateway", f"Greyproxy: {exc}"


def _upstream_error_response(exc: UpstreamFailure) -> bytes:
    return _error_response(*_upstream_error(exc))


async def _relay_body(src: Conn, dst: Conn, reader: "http1.BodyReader", timeout: float) -> None:
    """Copy one message body from src to dst as-is; leftover bytes stay in src.buf."""
    while True:
        if src.buf:
            data, rest, done = reader.feed(src.take())
            if rest:
                src.buf[:0] = rest
            if data:
                dst.write(data)
                await dst.drain()
            if done:
                return
        if not await src.read_more(timeout):
            if reader.until_close:
                return
            raise ConnClosed()


def _start_body(src, dst, reader: "http1.BodyReader", timeout: float) -> asyncio.Task:
    """Relay a request body in the background while the answer is awaited (the head is already sent:
    with `Expect: 100-continue` the client sends the body only once the upstream's 100 is relayed).
    A broken body (bad chunk framing, client gone or stalled) aborts `dst`, so the exchange ends at once."""
    task = asyncio.ensure_future(_relay_body(src, dst, reader, timeout))
    task.add_done_callback(lambda t: dst.abort() if not t.cancelled() and t.exception() is not None else None)
    return task


def _body_error(task: asyncio.Task | None) -> BaseException | None:
    """Why the request body relay failed, if it did."""
    if task is None or not task.done() or task.cancelled():
        return None
    return task.exception()


async def handle_http(client: ClientConn) -> None:
    ctx = client.ctx
    gate, limits = ctx.gate, ctx.limits
    identity = default_identity(client)
    pool = ctx.pool
    upstream: Conn | None = None
    upstream_key: tuple[str, str, int] | None = None  # (identity, host, port)
    clean = False  # the upstream's last exchange ended cleanly: it may serve another request
    cid: int | None = None
    first = True

    def release() -> None:
        """Done with the current upstream: parked for a later request when clean, else closed."""
        nonlocal upstream, cid
        if cid is not None:
            gate.untrack(cid)
            cid = None
        if upstream is not None:
            if clean and upstream_key is not None:
                pool.put(upstream_key, upstream)
            else:
                upstream.close()
            upstream = None

    async def attach(key: tuple[str, str, int], verdict: Verdict, fresh: bool) -> tuple[Conn, bool]:
        """An upstream for `key`: a parked one unless `fresh`, else a new connection (UpstreamFailure).
        (connection, whether it served a request before)."""
        nonlocal upstream, upstream_key, cid, clean
        release()
        up = None if fresh else pool.get(key)
        reused = up is not None
        if up is None:
            up = await connect(key[1], key[2], limits.connect_timeout, ctx.guard)
        upstream, upstream_key, clean = up, key, False

        def close_both(u: Conn = up) -> None:
            client.abort()
            u.abort()

        cid = gate.track(key[0], key[1], key[2], verdict, close_both)
        return up, reused

    def parse_req(buf: bytes):
        return http1.parse_request_head(buf, limits.max_header_bytes, limits.max_headers)

    try:
        while True:
            try:
                got = await _read_head(client, limits, parse_req, None if first else limits.idle_timeout)
            except asyncio.TimeoutError:
                if first or client.buf:
                    client.write(_error_response(408, "Request Timeout", "Greyproxy: request headers took too long"))
                return
            except http1.HttpError as exc:
                client.write(_error_response(exc.status, exc.reason, f"Greyproxy: {exc}"))
                return
            if got is None:
                return
            head, n = got
            del client.buf[:n]
            first = False
            if head.proxy_user:
                identity = head.proxy_user
            elif ctx.docker is not None and client.identity is None:
                identity = await unnamed_identity(client)
            container = identity
            cap = client.claim(identity)
            if cap is not None:
                client.write(_cap_response(cap, identity, limits))
                return

            if head.method == "CONNECT":
                verdict = await gate.admit(container, head.host, head.port, "CONNECT", client.gone())
                if client.closed:
                    gate.finish_log(verdict)
                    return
                if not verdict.allowed:
                    client.write(_error_response(403, "Forbidden", FORBIDDEN_BODY.decode()))
                    return
                try:
                    up = await connect(head.host, head.port, limits.connect_timeout, ctx.guard)
                except UpstreamFailure as exc:
                    gate.finish_log(verdict)
                    client.write(_upstream_error_response(exc))
                    return
                release()
                client.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await _tunnel(ctx, client, up, container, head.host, head.port, verdict, "CONNECT")
                return

            if head.scheme != "http":
                client.write(_error_response(400, "Bad Request", "Greyproxy: only http:// URLs can be forwarded; use CONNECT for https"))
                return
            verdict = await gate.admit(container, head.host, head.port, "HTTP", client.gone())
            if client.closed:
                return
            # The per-request pipeline of SPEC §7, as inside an intercepted tunnel: a transaction record.
            rec = ctx.recorder
            t = rec.txn(container, "http", head.host, head.port, head, verdict.rule_id) if rec is not None else None
            if not verdict.allowed:
                client.write(_error_response(403, "Forbidden", FORBIDDEN_BODY.decode()))
                if t is not None:
                    t.finish(status=403, result="blocked")
                return
            key = (container, head.host, head.port)
            reused = True  # the connection served a request before (it may have gone stale since)
            try:
                if upstream is None or upstream_key != key or not clean or not usable(upstream):
                    upstream, reused = await attach(key, verdict, fresh=False)
                elif cid is not None and cid in gate.live:
                    gate.live[cid].rule_id = verdict.rule_id
                substituted = substitute_credentials(head, container)
                if t is not None:
                    t.substituted = substituted
                clean = False
                try:
                    keep, clean = await _forward_one(client, upstream, head, limits, t, retry_stale=reused)
                except _StaleUpstream:
                    # The origin had closed the kept connection as the request went out (nothing
                    # was answered, nothing was consumed): once more on a new connection.
                    upstream, _ = await attach(key, verdict, fresh=True)
                    keep, clean = await _forward_one(client, upstream, head, limits, t)
            except UpstreamFailure as exc:
                upstream = None
                status, reason, text = _upstream_error(exc)
                client.write(_error_response(status, reason, text))
                if t is not None:
                    t.finish(status=status, result="blocked" if exc.kind == "guard" else "allowed")
                return
            if not keep:
                return
    finally:
        release()


class _StaleUpstream(Exception):
    """A reused upstream connection closed before answering a request that may be sent again."""


# Requests that may be sent again on a new connection when a kept one turns out closed (RFC 9110
# §9.2.2: idempotent), and only without a body (its bytes are gone once relayed).
_RETRYABLE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def _fail(client: Conn, t: Txn | None, status: int, reason: str, text: str) -> bool:
    """Answer with an error (the connection ends) and record it."""
    client.write(_error_response(status, reason, text))
    if t is not None:
        t.finish(status=status)
    return False


async def _forward_one(client: ClientConn, upstream: Conn, head: "http1.RequestHead", limits: Limits,
                       t: Txn | None = None, retry_stale: bool = False) -> tuple[bool, bool]:
    """Send one request upstream, stream the response back. (whether the client connection stays
    open, whether the upstream connection may serve another request: its exchange ended cleanly).

    With `t`, bodies pass through its capped capture and the record is sent when the exchange ends
    (however it ends); a WebSocket upgrade is relayed with each message recorded.
    With `retry_stale` (a reused connection), an upstream that closes without a byte of answer to a
    bodiless idempotent request raises `_StaleUpstream` (nothing sent to the client, nothing recorded)."""
    # An HTTP/1.0 client gets an HTTP/1.0 request upstream, so the answer is never chunked.
    version = "1.0" if head.version == "1.0" else "1.1"
    upstream.write(http1.render_request_head(head.method, head.path, version, head.upstream_headers()))
    body_task: asyncio.Task | None = None
    if head.chunked or (head.content_length or 0) > 0:
        reader = http1.BodyReader(head.content_length, head.chunked, sink=t.req_sink() if t is not None else None)
        body_task = _start_body(client, upstream, reader, limits.idle_timeout)
    continued = False  # a 100 Continue came
    interim = False  # any 1xx came (and went to the client)
    stale = False
    final: http1.ResponseHead | None = None
    try:
        while True:
            try:
                got = await _read_head(upstream, limits,
                                       lambda b: http1.parse_response_head(b, limits.max_header_bytes, head.method),
                                       limits.idle_timeout)
            except asyncio.TimeoutError:
                return False, _fail(client, t, 504, "Gateway Timeout", "Greyproxy: the upstream did not answer in time")
            except (http1.UpstreamError, http1.HttpError) as exc:
                return False, _fail(client, t, 502, "Bad Gateway", f"Greyproxy: bad response from upstream: {exc}")
            if got is None:
                if retry_stale and body_task is None and not interim and head.method in _RETRYABLE:
                    stale = True
                    raise _StaleUpstream()
                body_exc = _body_error(body_task)
                if isinstance(body_exc, http1.HttpError):
                    return False, _fail(client, t, body_exc.status, body_exc.reason, f"Greyproxy: {body_exc}")
                if body_exc is None:
                    return False, _fail(client, t, 502, "Bad Gateway",
                                        "Greyproxy: upstream closed the connection without answering")
                return False, False
            resp, n = got
            raw_head = upstream.take(n)
            if resp.status == 101:
                client.write(raw_head)
                if body_task is not None:
                    body_task.cancel()
                    await asyncio.gather(body_task, return_exceptions=True)  # its read ends before the relay's
                observers = (None, None)
                if t is not None:
                    t.finish(resp)
                    observers = t.recorder.websocket(t.container, "http", head.host, head.port, head, resp,
                                                     t.rule_id)
                await relay(client, upstream, limits.idle_timeout, *observers)
                return False, False
            if 100 <= resp.status < 200:
                if head.version != "1.0":  # RFC 9110 §15.2: never a 1xx to an HTTP/1.0 client
                    client.write(raw_head)  # interim (100 Continue): relay and keep reading
                continued = continued or resp.status == 100
                interim = True
                continue
            break
        final = resp
        # Answered without a 100 while the body is still owed: the client may never send it
        # (RFC 9110 §10.1.1), and bytes it sends next could be either the body or a new request.
        # So this exchange ends both connections instead of waiting for (or guessing at) them.
        body_owed = head.expect_continue and not continued and body_task is not None and not body_task.done()
        client_keep = head.keep_alive and not resp.until_close and not body_owed
        out_head = http1.render_response_head(resp, keep_alive=client_keep)
        if resp.has_body:
            reader = http1.BodyReader(resp.content_length, resp.chunked, until_close=resp.until_close,
                                      sink=t.resp_sink(resp) if t is not None else None)
            done = False
            if upstream.buf:
                # The body bytes already here leave with the head in one send (one wakeup of the client).
                data, rest, done = reader.feed(upstream.take())
                if rest:
                    upstream.buf[:0] = rest
                out_head += data
            client.write(out_head)
            if not done:
                await _relay_body(upstream, client, reader, limits.idle_timeout)
        else:
            client.write(out_head)
        if body_owed:
            upstream.abort()
            return False, False
        if body_task is not None:
            try:
                await asyncio.wait_for(body_task, limits.idle_timeout)
            except (asyncio.TimeoutError, ConnClosed, http1.HttpError):
                upstream.abort()
                return False, False
        if not resp.keep_alive or resp.until_close:
            upstream.close()
            return client_keep, False
        return client_keep, True
    finally:
        if body_task is not None and not body_task.done():
            body_task.cancel()
        if t is not None and not stale:
            t.finish(final)  # what passed, also when the exchange was cut off (a no-op if already sent)


# ---------------------------------------------------------------- SOCKS5 proxy

_SOCKS_FAIL = {"refused": socks5.REP_CONNECTION_REFUSED, "network": socks5.REP_NETWORK_UNREACHABLE,
               "dns": socks5.REP_HOST_UNREACHABLE, "unreachable": socks5.REP_HOST_UNREACHABLE,
               "timeout": socks5.REP_TTL_EXPIRED, "guard": socks5.REP_NOT_ALLOWED}


async def handle_socks(client: ClientConn) -> None:
    ctx = client.ctx
    gate, limits = ctx.gate, ctx.limits
    server = socks5.Socks5Server()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.header_timeout
    try:
        while server.request is None:
            if client.buf:
                for out in server.feed(client.take()):
                    client.write(out)
                if server.failed:
                    return
                if server.request is not None:
                    break
            remaining = deadline - loop.time()
            if remaining <= 0 or not await client.read_more(remaining):
                return
    except asyncio.TimeoutError:
        return
    except socks5.SocksError as exc:
        if exc.reply is not None:
            client.write(server.reply(exc.reply))
        return
    req = server.request
    container = req.username or await unnamed_identity(client)
    if client.claim(container) is not None:
        client.write(server.reply(socks5.REP_GENERAL_FAILURE))  # a connection cap (SPEC §3.1: 0x01)
        return
    if req.command != socks5.CMD_CONNECT:
        client.write(server.reply(socks5.REP_COMMAND_NOT_SUPPORTED))
        return
    verdict = await gate.admit(container, req.host, req.port, "SOCKS5", client.gone())
    if client.closed:
        gate.finish_log(verdict)
        return
    if not verdict.allowed:
        client.write(server.reply(socks5.REP_NOT_ALLOWED))
        return
    try:
        up = await connect(req.host, req.port, limits.connect_timeout, ctx.guard)
    except UpstreamFailure as exc:
        gate.finish_log(verdict)
        client.write(server.reply(_SOCKS_FAIL.get(exc.kind, socks5.REP_GENERAL_FAILURE)))
        return
    sock = up.transport.get_extra_info("sockname") if up.transport else None
    bind_host, bind_port = (str(sock[0]), int(sock[1])) if sock else ("0.0.0.0", 0)
    client.write(server.reply(socks5.REP_SUCCEEDED, bind_host, bind_port))
    if server.leftover:
        client.buf[:0] = server.leftover
    await _tunnel(ctx, client, up, container, req.host, req.port, verdict, "SOCKS5")


async def start_listener(ctx: ProxyContext, host: str, port: int, handler) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: ClientConn(ctx, handler), host, port, reuse_address=True, backlog=2048)
