"""The proxy's listening sockets (`context.start_listener`): TCP_DEFER_ACCEPT read back from the real
listener (the shared SO_REUSEPORT one of the workers too), and what it does to a connection that
speaks at once, one that says nothing, and one that connects and closes, on uvloop (the service's loop)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

import pytest
import uvloop

from services.proxy.context import DEFER_ACCEPT, ClientConn, Limits, ProxyContext, defer_accept, start_listener

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_DEFER_ACCEPT"), reason="Linux socket option")


def _ctx() -> ProxyContext:
    return ProxyContext(None, Limits())  # type: ignore[arg-type]  # (the gate is never asked here)


def _deferral(sock: Any) -> int:
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT))


@pytest.mark.parametrize("reuse_port", [False, True])
def test_the_listener_defers_accept(reuse_port: bool) -> None:
    async def handler(client: ClientConn) -> None:
        return None

    async def main() -> list[int]:
        ctx = _ctx()
        server = await start_listener(ctx, "127.0.0.1", 0, handler, reuse_port=reuse_port)
        try:
            got = [_deferral(s) for s in server.sockets]
            # A worker's socket shares the address (SO_REUSEPORT): the same option on its own socket.
            if reuse_port:
                port = server.sockets[0].getsockname()[1]
                second = await start_listener(ctx, "127.0.0.1", port, handler, reuse_port=True)
                got += [_deferral(s) for s in second.sockets]
                second.close()
            off = await start_listener(ctx, "127.0.0.1", 0, handler, defer=0)
            got.append(_deferral(off.sockets[0]))
            off.close()
            return got
        finally:
            server.close()

    got = uvloop.run(main())
    assert DEFER_ACCEPT >= 1
    assert got[:-1] == [DEFER_ACCEPT] * (len(got) - 1) and len(got) >= 2, got
    assert got[-1] == 0, got  # defer=0: off


def test_defer_accept_rounds_to_the_kernel_and_reports() -> None:
    async def main() -> tuple[bool, bool, int]:
        server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
        try:
            on = defer_accept(server, 2.6)
            value = _deferral(server.sockets[0])
            return on, defer_accept(server, 0), value
        finally:
            server.close()

    on, off, value = uvloop.run(main())
    assert on and not off
    assert value >= 3  # whole seconds, rounded up to the SYN-ACK retransmission schedule (3)


def test_a_connection_is_handed_over_with_its_first_bytes_a_silent_one_after_the_deferral() -> None:
    """Speaking at once: accepted at once, its first bytes there. Connect-and-close: accepted at once
    (EOF). Silent: not accepted before the deferral, accepted after it (its header deadline counts
    from then, `test_limits.py`)."""

    async def main() -> dict[str, Any]:
        ctx = _ctx()
        accepted: list[tuple[float, bytes, bool]] = []

        async def handler(client: ClientConn) -> None:
            if not client.buf and not client.eof:
                with contextlib.suppress(TimeoutError):
                    await client.read_more(0.2)  # (the silent one says nothing after its accept either)
            accepted.append((time.monotonic(), bytes(client.buf), client.eof))

        async def until(n: int, limit: float) -> float:
            t0 = time.monotonic()
            while len(accepted) < n and time.monotonic() - t0 < limit:
                await asyncio.sleep(0.01)
            return time.monotonic() - t0

        server = await start_listener(ctx, "127.0.0.1", 0, handler)
        port = server.sockets[0].getsockname()[1]
        out: dict[str, Any] = {}
        socks = []
        try:
            a = socket.create_connection(("127.0.0.1", port))  # speaks at once
            socks.append(a)
            a.sendall(b"GET http://x/ HTTP/1.1\r\n\r\n")
            out["speaker"] = await until(1, 2)
            b = socket.create_connection(("127.0.0.1", port))  # connects and closes
            b.close()
            out["closer"] = await until(2, 2)
            c = socket.create_connection(("127.0.0.1", port))  # says nothing
            socks.append(c)
            await asyncio.sleep(0.5)
            out["silent_early"] = ctx.active  # the two above are done (finished): the silent one only
            out["silent"] = (await until(3, DEFER_ACCEPT + 5)) + 0.5
            out["silent_early_accepted"] = len(accepted)
            out["accepted"] = list(accepted)
        finally:
            for x in socks:
                x.close()
            server.close()
        return out

    out = uvloop.run(main())
    got = out["accepted"]
    assert len(got) == 3, out
    assert got[0][1].startswith(b"GET http://x/") and out["speaker"] < 1.0, out
    assert got[1][1] == b"" and got[1][2] and out["closer"] < 1.0, out
    assert out["silent_early"] == 0, out  # half a second in: not accepted yet
    assert DEFER_ACCEPT - 0.3 <= out["silent"] <= DEFER_ACCEPT + 3, out
