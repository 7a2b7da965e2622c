"""The SOCKS5 listener (RFC 1928 CONNECT, RFC 1929 user name as client identity): the sans-I/O
handshake of `socks5.py`, the gate's decision, then a tunnel (`tunnel.py`).
"""

from __future__ import annotations

import asyncio

from . import socks5
from .conn import PipeConn
from .context import ClientConn, unnamed_identity
from .gate import Admission
from .tunnel import run_tunnel
from .upstream import UpstreamFailure, connect

_SOCKS_FAIL = {
    "refused": socks5.REP_CONNECTION_REFUSED,
    "network": socks5.REP_NETWORK_UNREACHABLE,
    "dns": socks5.REP_HOST_UNREACHABLE,
    "unreachable": socks5.REP_HOST_UNREACHABLE,
    "timeout": socks5.REP_TTL_EXPIRED,
    "guard": socks5.REP_NOT_ALLOWED,
}


async def handle_socks(client: ClientConn) -> None:
    ctx = client.ctx
    gate, limits = ctx.gate, ctx.limits
    ids = ctx.identities
    server = socks5.Socks5Server(hold_auth=ids is not None)
    loop = client._loop or client._bind_loop()  # (asyncio.get_running_loop() costs a getpid())
    deadline = loop.time() + limits.header_timeout
    try:
        while server.request is None:
            if client.buf:
                for out in server.feed(client.take()):
                    client.write(out)
                if server.pending_auth is not None and ids is not None:
                    # A claimed name must present its secret (SPEC §16): judged before the request.
                    name, secret = server.pending_auth
                    ok = (
                        name is None
                        or ids.quick(name, secret)
                        or await ids.check(name, secret, src_ip=client.src_ip, protocol="SOCKS5")
                    )
                    client.claimed = ok and ids.claims.claimed(name)
                    client.write(server.answer_auth(ok))
                    if not ok:
                        return
                    for out in server.feed(b""):
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
    verdict = await gate.admit(container, req.host, req.port, "SOCKS5", client.gone)
    if client.closed:
        gate.finish_log(verdict)
        return
    if not verdict.allowed:
        client.write(server.reply(socks5.REP_NOT_ALLOWED))
        return
    admission = Admission(gate, container, req.host, req.port, "SOCKS5", verdict)
    try:
        up = await connect(req.host, req.port, limits.connect_timeout, admission, protocol=PipeConn)
    except UpstreamFailure as exc:
        gate.finish_log(verdict)
        client.write(server.reply(_SOCKS_FAIL.get(exc.kind, socks5.REP_GENERAL_FAILURE)))
        return
    sock = up.transport.get_extra_info("sockname") if up.transport else None
    bind_host, bind_port = (str(sock[0]), int(sock[1])) if sock else ("0.0.0.0", 0)
    client.write(server.reply(socks5.REP_SUCCEEDED, bind_host, bind_port))
    if server.leftover:
        client.buf[:0] = server.leftover
    await run_tunnel(ctx, client, up, container, req.host, req.port, verdict, "SOCKS5")
