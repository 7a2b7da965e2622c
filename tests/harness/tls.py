"""HTTPS origins with trustme certificates, for tests that go through the proxy's interception."""

from __future__ import annotations

import contextlib
import http.server
import ssl
import threading
from collections.abc import Iterator
from typing import Any


class TlsHttpServer(http.server.ThreadingHTTPServer):
    """A threaded HTTPS origin. Handshakes run in the handler threads, not in accept, so a client
    that does not trust the certificate fails only its own connection."""

    daemon_threads = True

    def __init__(self, addr: tuple[str, int], handler: type, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        super().__init__(addr, handler)

    def get_request(self):  # noqa: ANN201
        sock, addr = self.socket.accept()
        return self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def finish_request(self, request, client_address) -> None:  # noqa: ANN001
        try:
            request.do_handshake()
        except (ssl.SSLError, OSError):
            return
        super().finish_request(request, client_address)


def server_context(ca: Any, host: str, *more_names: str) -> ssl.SSLContext:
    """A server-side TLS context with a certificate from `ca` (a ``trustme.CA``) for `host` and
    `more_names` (an HTTPS or a ``websocket_origin(..., ssl=...)`` origin)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(host, *more_names).configure_cert(ctx)
    return ctx


def start_https_origin(ca: Any, host: str, handler: type, *more_names: str) -> tuple[TlsHttpServer, int]:
    """Serve `handler` (a BaseHTTPRequestHandler) over TLS on host:<free port> with a certificate
    from `ca` (a ``trustme.CA``) for `host` and `more_names`, in a daemon thread. Returns
    (server, port); the caller calls ``server.shutdown(); server.server_close()``. Let the proxy
    trust it through ``mitm.upstreamCaFile`` (``ca.cert_pem.write_to_path(...)``)."""
    server = TlsHttpServer((host, 0), handler, server_context(ca, host, *more_names))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, server.server_address[1]


@contextlib.contextmanager
def https_origin(ca: Any, host: str, handler: type, *more_names: str) -> Iterator[int]:
    """``start_https_origin`` as a context manager: yields the port, shuts the server down after."""
    server, port = start_https_origin(ca, host, handler, *more_names)
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()
