"""bench/harness/bare_tunnel.py: the bare uvloop CONNECT tunnel, the floor `make bench` compares with.

A floor that buffered a whole download in memory instead of pausing would not be a tunnel a proxy
could be: it relays every byte, and a slow client makes it stop reading the origin.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parent.parent.parent / "bench" / "harness" / "bare_tunnel.py"
MiB = 1 << 20


@pytest.fixture(scope="module")
def bare():
    spec = importlib.util.spec_from_file_location("bench_bare_tunnel_under_test", PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(30)
def test_relays_everything_and_stops_reading_the_origin_for_a_slow_client(bare) -> None:
    total = 64 * MiB

    async def main() -> None:
        async def origin(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.readuntil(b"\r\n\r\n")
            block = b"x" * MiB
            for _ in range(total // MiB):
                w.write(block)
                await w.drain()
            w.close()

        origin_server = await asyncio.start_server(origin, "127.0.0.1", 0)
        oport = origin_server.sockets[0].getsockname()[1]
        tunnels: list = []

        def factory():
            tunnels.append(bare.BareTunnel())
            return tunnels[-1]

        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        r, w = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        w.write(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (oport, oport))
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        w.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(1.0)  # the client reads nothing: kernel buffers fill, then the tunnel's
        buffered = tunnels[0].transport.get_write_buffer_size()
        assert buffered < 2 * MiB, f"the tunnel buffered {buffered} bytes instead of pausing the origin"
        got = 0
        while True:
            chunk = await asyncio.wait_for(r.read(MiB), 10)
            if not chunk:
                break
            got += len(chunk)
        assert got == total
        w.close()
        server.close()
        origin_server.close()

    asyncio.run(main())
