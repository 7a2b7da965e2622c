"""A new connection's first request and a new CONNECT are served from the connection's callbacks,
with no asyncio task, until something waits (keepalive.py); these are what such steps reach
through the real stack with real clients where the handler's task used to be there."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from conftest import JsonEchoHandler, OriginHandler, Stack, intercepting_stack, plain_origin

pytestmark = pytest.mark.stack


class ClosingHandler(OriginHandler):
    """Answers each request and closes its connection (`Connection: close`)."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.close_connection = True
        self.reply(f"closing {self.path}".encode(), Connection="close")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with intercepting_stack(allow=["127.0.0.1"]) as s:
        yield s


def _read_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        out += chunk
    return out


def test_pipelined_requests_in_an_intercepted_tunnel_reconnect_to_an_origin_that_closes(stack: Stack) -> None:
    """A client that sends its CONNECT and two plain-HTTP requests at once: the tunnel's first wait
    is the first answer, then the origin has closed, and the second request needs a new upstream
    connection (an IP literal: no lookup, so nothing waits before it). That connect ran in the
    callback that resumed the tunnel, without a task, and failed: no second answer."""
    with plain_origin(ClosingHandler) as port:
        target = f"127.0.0.1:{port}".encode()
        req = b"GET /%d HTTP/1.1\r\nHost: " + target + b"\r\n\r\n"
        with socket.create_connection(("127.0.0.1", stack.ports["http-proxy"]), timeout=10) as s:
            s.sendall(b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n\r\n" + req % 1 + req % 2)
            got = _read_all(s)
    assert got.startswith(b"HTTP/1.1 200 Connection established\r\n\r\n"), got[:80]
    assert b"closing /1" in got, got
    assert b"closing /2" in got, got
    assert "connection handler failed" not in stack.logs(200)


def test_a_pipelined_upload_in_an_intercepted_tunnel_is_answered(stack: Stack) -> None:
    """CONNECT and a POST at once: the answer is the tunnel's first wait, so the request body's end
    is awaited from the callbacks, without a task (`Exchange._request_body_end`; with Python 3.12's
    wait_for that raised: tests/unit/test_exchange.py)."""
    body = b'{"a": 1}'
    with plain_origin(JsonEchoHandler) as port:
        target = f"127.0.0.1:{port}".encode()
        post = b"POST /x HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % (
            target,
            len(body),
        )
        with socket.create_connection(("127.0.0.1", stack.ports["http-proxy"]), timeout=10) as s:
            s.sendall(b"CONNECT " + target + b" HTTP/1.1\r\n\r\n" + post + b"Connection: close\r\n\r\n" + body)
            got = _read_all(s)
    assert got.startswith(b"HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200 OK\r\n"), got[:120]
    assert got.endswith(b'{"echo": {"a": 1}}'), got
