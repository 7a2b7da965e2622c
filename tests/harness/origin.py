"""Origins on loopback for stack tests: plain HTTP (threaded ``http.server``) and WebSocket.

- ``OriginHandler``: the base of the suite's HTTP origins (HTTP/1.1 keep-alive, nothing logged,
  ``reply()`` for a whole answer); ``ReachedHandler`` answers every GET with ``reached``,
  ``HelloHandler`` with ``hello``, ``PathHandler`` with ``hello from origin <path>``;
  ``JsonEchoHandler`` echoes a POSTed JSON body.
- ``plain_origin(handler, host)``: serve a handler class on host:<free port> for a ``with`` block.
- ``websocket_origin(handler, host)``: a ``websockets`` server in its own thread and event loop.
- ``echo_origin(host, banner)``: a TCP server (neither TLS nor HTTP) that echoes what it gets,
  after sending ``banner`` first when given (as SMTP or SSH servers speak first).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import socket
import ssl as _ssl
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any


class OriginHandler(http.server.BaseHTTPRequestHandler):
    """Base of a test origin: HTTP/1.1 keep-alive, nothing logged, ``reply()`` for one answer."""

    protocol_version = "HTTP/1.1"

    def reply(self, body: bytes, content_type: str | None = None, status: int = 200, **headers: str) -> None:
        """Status, Content-Type (when given), Content-Length, then ``headers`` (a keyword's `_`
        becomes `-`: ``Set_Cookie=...``), then the body."""
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class JsonEchoHandler(OriginHandler):
    """POST: 200 ``{"echo": <the JSON request body>}`` (application/json); GET is the subclass's."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.reply(json.dumps({"echo": json.loads(data)}).encode(), "application/json")


class ReachedHandler(OriginHandler):
    """200 `reached\\n` to every GET (no Content-Type); subclasses change ``answer()``."""

    def answer(self) -> bytes:
        return b"reached\n"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.reply(self.answer())


class HelloHandler(ReachedHandler):
    """200 `hello\\n` to every GET."""

    def answer(self) -> bytes:
        return b"hello\n"


class PathHandler(ReachedHandler):
    """200 `hello from origin <path>\\n` to every GET: the answer tells which request got through."""

    def answer(self) -> bytes:
        return f"hello from origin {self.path}\n".encode()


@contextlib.contextmanager
def plain_origin(
    handler: type[http.server.BaseHTTPRequestHandler] = ReachedHandler, host: str = "127.0.0.1"
) -> Iterator[int]:
    """A threaded HTTP origin on host:<free port> (the port is yielded) until the block ends."""
    server = http.server.ThreadingHTTPServer((host, 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def echo_origin(host: str = "127.0.0.1", banner: bytes = b"", tls: _ssl.SSLContext | None = None) -> Iterator[int]:
    """A TCP echo server on host:<free port> (yielded) until the block ends, a thread per
    connection; each connection gets `banner` first. With `tls`, each connection is TLS (server
    side, that context: its ALPN protocols too) before it echoes."""
    srv = socket.create_server((host, 0))

    def serve(conn: socket.socket) -> None:
        try:
            with tls.wrap_socket(conn, server_side=True) if tls is not None else conn as c:
                if banner:
                    c.sendall(banner)
                while data := c.recv(4096):
                    c.sendall(data)
        except (_ssl.SSLError, OSError):
            pass  # (a client that left, or failed its handshake)

    def accept() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield srv.getsockname()[1]
    finally:
        srv.close()


@contextlib.contextmanager
def websocket_origin(
    handler: Callable[[Any], Awaitable[None]],
    host: str = "127.0.0.1",
    ssl: _ssl.SSLContext | None = None,
    **options: Any,
) -> Iterator[int]:
    """``websockets.asyncio.server.serve(handler, host, <free port>, ssl=ssl, **options)`` in a
    thread of its own (its own event loop) until the block ends; yields the port."""
    from websockets.asyncio.server import serve

    loop = asyncio.new_event_loop()
    stop = loop.create_future()
    ready = threading.Event()
    port: list[int] = []

    async def main() -> None:
        async with serve(handler, host, 0, ssl=ssl, **options) as server:
            port.append(server.sockets[0].getsockname()[1])
            ready.set()
            await stop

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10), "the WebSocket origin did not start"
    try:
        yield port[0]
    finally:
        loop.call_soon_threadsafe(stop.set_result, None)
        thread.join(5)
