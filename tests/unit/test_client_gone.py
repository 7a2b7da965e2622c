"""`ClientConn.gone`, the future that ends a hold early, without sockets: a held client that closes
its socket normally sends a FIN (curl --max-time, requests' and httpx's timeouts), which asyncio
reports as `eof_received` on a transport it keeps open; that must count as gone, as the close does."""

from __future__ import annotations

import asyncio

from services.proxy.context import ClientConn, Limits, ProxyContext
from test_proxy_limits import FakeTransport, _noop


def _client() -> ClientConn:
    ctx = ProxyContext(gate=None, limits=Limits())  # type: ignore[arg-type]
    c = ClientConn(ctx, _noop)
    c.connection_made(FakeTransport(c))  # type: ignore[arg-type]
    return c


def test_a_fin_during_the_hold_is_gone() -> None:
    async def main() -> None:
        c = _client()
        gone = c.gone()
        await asyncio.sleep(0)
        assert not gone.done()
        assert c.eof_received() is True  # the transport stays open (half-close is passed on in tunnels)
        assert gone.done()
        c.task.cancel()  # type: ignore[union-attr]

    asyncio.run(main())


def test_a_fin_before_the_hold_is_gone_at_once() -> None:
    async def main() -> None:
        c = _client()
        c.eof_received()
        assert c.gone().done()
        c.task.cancel()  # type: ignore[union-attr]

    asyncio.run(main())


def test_the_close_is_gone_and_wait_closed_still_waits_for_it() -> None:
    """The FIN ends the hold but not `wait_closed` (TLS close waits on it for the real close)."""

    async def main() -> None:
        c = _client()
        gone = c.gone()
        closed = asyncio.ensure_future(c.wait_closed())
        c.eof_received()
        await asyncio.sleep(0)
        assert gone.done() and not closed.done()
        c.connection_lost(None)
        await asyncio.wait_for(closed, 1)
        c.task.cancel()  # type: ignore[union-attr]

    asyncio.run(main())
