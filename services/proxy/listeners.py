"""The HTTP and SOCKS5 listeners: protocol I/O around the sans-I/O parsers and the gate."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from . import http1, socks5
from .conn import Conn, ConnClosed, splice
from .gate import Gate, Verdict
from .upstream import UpstreamFailure, connect

log = logging.getLogger("greyproxy.proxy")

FORBIDDEN_BODY = b"Blocked by Greyproxy: this destination is not allowed\n"


@dataclass
class Limits:
    header_timeout: float = 30.0
    connect_timeout: float = 10.0
    idle_timeout: float = 600.0
    max_header_bytes: int = 65536
    max_headers: int = 100
    max_connections: int = 10000
    max_per_client: int = 1000


# Called after a CONNECT/SOCKS tunnel is allowed and connected, before piping. Returns True when it
# took the connection over (HTTPS interception); None/False → plain tunnel. Set by later capabilities.
TunnelHook = Callable[["ProxyContext", Conn, Conn, str, str, int, Verdict, str], Awaitable[bool]]


class ProxyContext:
    """What both listeners share."""

    def __init__(self, gate: Gate, limits: Limits) -> None:
        self.gate = gate
        self.limits = limits
        self.active = 0
        self.per_client: dict[str, int] = {}
        self.tunnel_hook: TunnelHook | None = None

    def guard(self, ip: str, port: int) -> bool:
        return self.gate.is_own_listener(ip, port)


class ClientConn(Conn):
    """An accepted client connection: starts its handler task once connected."""

    __slots__ = ("handler", "ctx", "task", "src_ip")

    def __init__(self, ctx: ProxyContext, handler: Callable[["ClientConn"], Awaitable[None]]) -> None:
        super().__init__()
        self.ctx = ctx
        self.handler = handler
        self.task: asyncio.Task | None = None
        self.src_ip = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.src_ip = self.peername()[0]
        ctx = self.ctx
        if ctx.active >= ctx.limits.max_connections or ctx.per_client.get(self.src_ip, 0) >= ctx.limits.max_per_client:
            log.warning("connection limit reached; refusing %s", self.src_ip)
            transport.abort()  # type: ignore[attr-defined]
            return
        ctx.active += 1
        ctx.per_client[self.src_ip] = ctx.per_client.get(self.src_ip, 0) + 1
        self.task = asyncio.ensure_future(self._run())

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
            ctx = self.ctx
            ctx.active -= 1
            n = ctx.per_client.get(self.src_ip, 1) - 1
            if n <= 0:
                ctx.per_client.pop(self.src_ip, None)
            else:
                ctx.per_client[self.src_ip] = n
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


async def _tunnel(ctx: ProxyContext, client: Conn, upstream: Conn, container: str, host: str, port: int,
                  verdict: Verdict, method: str) -> None:
    """Pipe both ways until both sides are closed; closed early if the allowing rule goes away."""
    gate = ctx.gate

    def close_both() -> None:
        client.abort()
        upstream.abort()

    cid = gate.track(container, host, port, verdict, close_both)
    try:
        if ctx.tunnel_hook is not None and await ctx.tunnel_hook(ctx, client, upstream, container, host, port,
                                                                 verdict, method):
            return
        splice(client, upstream)
        await asyncio.gather(client.wait_closed(), upstream.wait_closed())
    finally:
        gate.finish_log(verdict)  # the hook writes it with its mitm_skip_reason; a plain tunnel here
        gate.untrack(cid)
        client.close()
        upstream.close()


# ---------------------------------------------------------------- HTTP proxy

async def _read_head(conn: Conn, limits: Limits, parse: Callable, first_timeout: float | None):
    """Read until a full head parses. None when the peer closed cleanly before sending anything."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.header_timeout
    while True:
        if conn.buf:
            parsed = parse(bytes(conn.buf))
            if parsed is not None:
                return parsed
        remaining = deadline - loop.time()
        if not conn.buf and first_timeout is not None:
            remaining = min(remaining, first_timeout)
        if remaining <= 0:
            raise asyncio.TimeoutError()
        if not await conn.read_more(remaining):
            if conn.buf:
                raise http1.HttpError(400, "incomplete request")
            return None


def _error_response(status: int, reason: str, text: str) -> bytes:
    return http1.render_response(status, reason, (text.rstrip("\n") + "\n").encode(), close=True)


def _upstream_error_response(exc: UpstreamFailure) -> bytes:
    if exc.kind == "guard":
        return _error_response(403, "Forbidden", "Blocked by Greyproxy: that is this proxy's own listener")
    if exc.kind == "timeout":
        return _error_response(504, "Gateway Timeout", f"Greyproxy: {exc}")
    return _error_response(502, "Bad Gateway", f"Greyproxy: {exc}")


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


async def handle_http(client: ClientConn) -> None:
    ctx = client.ctx
    gate, limits = ctx.gate, ctx.limits
    identity = default_identity(client)
    upstream: Conn | None = None
    upstream_key: tuple[str, int] | None = None
    cid: int | None = None
    first = True

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
            container = identity

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
                if upstream is not None:
                    upstream.close()
                    upstream = None
                client.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await _tunnel(ctx, client, up, container, head.host, head.port, verdict, "CONNECT")
                return

            if head.scheme != "http":
                client.write(_error_response(400, "Bad Request", "Greyproxy: only http:// URLs can be forwarded; use CONNECT for https"))
                return
            verdict = await gate.admit(container, head.host, head.port, "HTTP", client.gone())
            if client.closed:
                return
            if not verdict.allowed:
                client.write(_error_response(403, "Forbidden", FORBIDDEN_BODY.decode()))
                return
            key = (head.host, head.port)
            if upstream is None or upstream.closed or upstream_key != key:
                if upstream is not None:
                    upstream.close()
                if cid is not None:
                    gate.untrack(cid)
                    cid = None
                try:
                    upstream = await connect(head.host, head.port, limits.connect_timeout, ctx.guard)
                except UpstreamFailure as exc:
                    upstream = None
                    client.write(_upstream_error_response(exc))
                    return
                upstream_key = key
                up_ref = upstream

                def close_both(up: Conn = up_ref) -> None:
                    client.abort()
                    up.abort()

                cid = gate.track(container, head.host, head.port, verdict, close_both)
            elif cid is not None and cid in gate.live:
                gate.live[cid].rule_id = verdict.rule_id
            keep = await _forward_one(client, upstream, head, limits)
            if upstream.closed:
                upstream = None
            if not keep:
                return
    finally:
        if cid is not None:
            gate.untrack(cid)
        if upstream is not None:
            upstream.close()


async def _forward_one(client: ClientConn, upstream: Conn, head: "http1.RequestHead", limits: Limits) -> bool:
    """Send one request upstream, stream the response back. True if the client connection stays open."""
    # An HTTP/1.0 client gets an HTTP/1.0 request upstream, so the answer is never chunked.
    version = "1.0" if head.version == "1.0" else "1.1"
    upstream.write(http1.render_request_head(head.method, head.path, version, head.upstream_headers()))
    body_task: asyncio.Task | None = None
    if head.chunked or (head.content_length or 0) > 0:
        reader = http1.BodyReader(head.content_length, head.chunked)
        body_task = asyncio.ensure_future(_relay_body(client, upstream, reader, limits.idle_timeout))
    try:
        while True:
            try:
                got = await _read_head(upstream, limits,
                                       lambda b: http1.parse_response_head(b, limits.max_header_bytes, head.method),
                                       limits.idle_timeout)
            except asyncio.TimeoutError:
                client.write(_error_response(504, "Gateway Timeout", "Greyproxy: the upstream did not answer in time"))
                return False
            except http1.UpstreamError as exc:
                client.write(_error_response(502, "Bad Gateway", f"Greyproxy: bad response from upstream: {exc}"))
                return False
            except http1.HttpError as exc:
                client.write(_error_response(502, "Bad Gateway", f"Greyproxy: bad response from upstream: {exc}"))
                return False
            if got is None:
                client.write(_error_response(502, "Bad Gateway", "Greyproxy: upstream closed the connection without answering"))
                return False
            resp, n = got
            raw_head = upstream.take(n)
            if resp.status == 101:
                client.write(raw_head)
                if body_task is not None:
                    body_task.cancel()
                splice(client, upstream)
                await asyncio.gather(client.wait_closed(), upstream.wait_closed())
                return False
            if 100 <= resp.status < 200:
                client.write(raw_head)  # interim (100 Continue): relay and keep reading
                continue
            break
        client_keep = head.keep_alive and not resp.until_close
        client.write(http1.render_response_head(resp, keep_alive=client_keep))
        if resp.has_body:
            reader = http1.BodyReader(resp.content_length, resp.chunked, until_close=resp.until_close)
            await _relay_body(upstream, client, reader, limits.idle_timeout)
        if body_task is not None:
            try:
                await asyncio.wait_for(body_task, limits.idle_timeout)
            except (asyncio.TimeoutError, ConnClosed):
                return False
        if not resp.keep_alive or resp.until_close:
            upstream.close()
        return client_keep
    finally:
        if body_task is not None and not body_task.done():
            body_task.cancel()


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
    if req.command != socks5.CMD_CONNECT:
        client.write(server.reply(socks5.REP_COMMAND_NOT_SUPPORTED))
        return
    container = req.username or default_identity(client)
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
