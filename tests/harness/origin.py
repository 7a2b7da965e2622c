"""A plain HTTP origin on loopback for stack tests: answers every GET with `reached`."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from typing import Any

from .util import free_port


class ReachedHandler(http.server.BaseHTTPRequestHandler):
    """200 `reached\\n` to every GET (keep-alive HTTP/1.1), nothing logged."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = b"reached\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def plain_origin(handler: type[http.server.BaseHTTPRequestHandler] = ReachedHandler) -> Iterator[int]:
    """A threaded HTTP origin on 127.0.0.1 (a free port, yielded) until the block ends."""
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()
