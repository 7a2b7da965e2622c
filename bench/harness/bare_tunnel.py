"""A bare CONNECT tunnel on uvloop: the floor for a Python proxy on this event loop.

About forty lines of `asyncio.Protocol`: read the CONNECT head, `create_connection` to its
authority, answer 200, then relay both ways with flow control (a side whose peer's write buffer
is full stops reading until it drains). No rules, no log record, no caps, no timers. Used in
process by bench/conn_path.py and bench/tunnel_instr.py (`bare`), and as its own process by
bench/run.py (the `bare-uvloop` column):

    python bench/harness/bare_tunnel.py [--port N]     prints the port it listens on, serves until killed
"""

from __future__ import annotations

import asyncio


class BarePipe(asyncio.Protocol):
    """One side of the bare tunnel: everything read goes to the peer."""

    def __init__(self) -> None:
        self.peer: asyncio.Transport | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.write(data)

    def pause_writing(self) -> None:  # our transport's buffer is full: the peer stops reading
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()
            self.peer = None


class BareTunnel(BarePipe):
    """The client side: reads the CONNECT head, connects, answers 200, then relays."""

    def __init__(self) -> None:
        super().__init__()
        self.buf = b""
        self.up: BarePipe | None = None

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.write(data)
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end >= 0 and self.up is None:
            host, _, port = self.buf.split(b" ", 2)[1].decode().rpartition(":")
            self.up = BarePipe()
            asyncio.get_running_loop().create_task(self._connect(host, int(port), self.buf[end + 4 :]))

    async def _connect(self, host: str, port: int, rest: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            t, _ = await loop.create_connection(lambda: self.up, host, port)  # type: ignore[return-value]
        except OSError:
            self.transport.close()  # type: ignore[union-attr]
            return
        assert self.up is not None and self.transport is not None
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if rest:
            t.write(rest)
        self.peer, self.up.peer = t, self.transport  # type: ignore[assignment]


async def bare_listener(port: int = 0) -> asyncio.AbstractServer:
    return await asyncio.get_running_loop().create_server(BareTunnel, "127.0.0.1", port, backlog=2048)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import gc

    import uvloop

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    args = ap.parse_args(argv)

    async def serve() -> None:
        server = await bare_listener(args.port)
        gc.collect()  # as the proxy's service does once started (runtime.tune_gc), and conn_path
        gc.freeze()
        gc.set_threshold(5000, 10, 10)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    uvloop.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
