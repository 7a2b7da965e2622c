"""A client that leaves while its answer is awaited or streamed ends the exchange at once: the
upstream connection is aborted then (an LLM provider stops generating an answer nobody will read),
not at the next write that fails, for plain HTTP through the forward proxy and for intercepted
HTTPS; the transaction says the client went away. `proxy.halfClosedClients: true` keeps answering
a client that only half-closed its connection after its request.

Real clients: curl with `--max-time` (it closes its connection when the time is up, as an SDK's
timeout or a cancelled call does) and raw sockets for the half-close. The origins note how long
after a request their connection was closed by the proxy.
"""

from __future__ import annotations

import http.server
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

import harness
from conftest import Stack, add_rule, https_origin, intercepting_stack, wait_for

pytestmark = [pytest.mark.stack, pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required")]

HOST = "127.0.0.1"
TLS_HOST = "127.0.0.2"
WAIT = 15.0  # seconds /slow and /stream wait for the proxy to close before giving up
QUICK = 0.8  # seconds /quick waits before answering
BIG = 256 << 20  # bytes of /big

CLOSED: dict[str, float | None] = {}  # path (with its ?tag) -> seconds from request to close seen; None: not closed
LOCK = threading.Lock()


class _Origin(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _until_closed(self) -> None:
        """Wait (at most WAIT) for the proxy to close this connection; note how long it took."""
        t0 = time.monotonic()
        self.connection.settimeout(WAIT)
        closed: float | None = None
        try:
            while True:
                if not self.connection.recv(64):
                    closed = time.monotonic() - t0
                    break
        except TimeoutError:
            pass
        except OSError:  # (a reset, a TLS error on the abort: closed too)
            closed = time.monotonic() - t0
        with LOCK:
            CLOSED[self.path] = closed
        self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/slow"):
            self._until_closed()  # never answers: as a long completion being generated
        elif self.path.startswith("/stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            data = b"data: first\n\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
            self._until_closed()  # then quiet: the next event would come much later
        elif self.path.startswith("/big"):
            # A download far bigger than every buffer on the way: written until the proxy stops it.
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(BIG))
            self.end_headers()
            chunk = b"\0" * (64 << 10)
            try:
                for _ in range(BIG // len(chunk)):
                    self.wfile.write(chunk)
            except OSError:
                pass
            self.close_connection = True
        else:  # /quick
            time.sleep(QUICK)
            body = b"quick answer\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


@pytest.fixture(scope="module")
def origin() -> Iterator[int]:
    with harness.plain_origin(_Origin, HOST) as port:
        yield port


@pytest.fixture(scope="module")
def tls_origin(origin_ca: trustme.CA) -> Iterator[int]:
    with https_origin(origin_ca, TLS_HOST, _Origin) as port:
        yield port


@pytest.fixture(scope="module")
def stack(origin_ca_file: Path) -> Iterator[Stack]:
    with intercepting_stack({"proxy": {"holdTimeout": 2}}, origin_ca_file, allow=(HOST, TLS_HOST)) as s:
        yield s


def _closed_after(path: str) -> float | None:
    """Seconds from the request to the proxy closing the origin's connection (waits for the origin to tell)."""
    wait_for(lambda: path in CLOSED, WAIT + 5, message=f"the origin's verdict on {path}")
    return CLOSED[path]


def _transaction(stack: Stack, container: str, target: str = "") -> dict:
    """The container's transaction whose URL ends with `target` (once recorded)."""

    def find() -> dict | None:
        r = stack.get("/api/transactions", params={"container": container, "limit": 5})
        items = [i for i in r.json()["items"] if i["container_name"] == container and i["url"].endswith(target)]
        return items[0] if items else None

    return wait_for(find, 10, message=f"{container}'s transaction")


def _curl(*args: str, max_time: float) -> int:
    p = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "--max-time", str(max_time), *args], capture_output=True, timeout=30
    )
    return p.returncode


def _via(stack: Stack, container: str) -> list[str]:
    return ["-x", f"http://{container}@127.0.0.1:{stack.ports['http-proxy']}"]


@pytest.mark.parametrize("path", ["/slow", "/stream", "/quick+/slow", "/quick+/stream"])
def test_a_plain_http_client_that_leaves_aborts_its_upstream(stack: Stack, origin: int, path: str) -> None:
    """The connection's first request (the handler's exchange), or its second, on the upstream kept
    from the first (the kept-alive cycle's callbacks)."""
    container = "leave-plain" + path.replace("/", "-").replace("+", "")
    first, _, last = path.rpartition("+")
    target = f"{last}?{container}"
    urls = [f"http://{HOST}:{origin}{p}?{container}" for p in (first, last) if p]
    max_time = 1 + (QUICK if first else 0)
    assert _curl(*_via(stack, container), *urls, max_time=max_time) == 28  # timed out
    closed = _closed_after(target)
    assert closed is not None and closed < 1 + 3, closed  # at curl's leaving, not WAIT seconds later
    t = _transaction(stack, container, target)
    when = "before the answer came" if last == "/slow" else "during the response"
    assert t["error"] == f"the client went away {when}", t
    if last == "/stream":
        assert t["status_code"] == 200 and t["response_body_size"] > 0


@pytest.mark.parametrize("path", ["/slow", "/stream"])
def test_an_intercepted_https_client_that_leaves_aborts_its_upstream(stack: Stack, tls_origin: int, path: str) -> None:
    container = f"leave-tls{path.replace('/', '-')}"
    target = f"{path}?{container}"
    ca = str(stack.data_dir / "ca-cert.pem")
    args = ["-p", *_via(stack, container), "--cacert", ca, f"https://{TLS_HOST}:{tls_origin}{target}"]
    assert _curl(*args, max_time=1.5) == 28
    closed = _closed_after(target)
    assert closed is not None and closed < 1.5 + 3, closed
    t = _transaction(stack, container)
    when = "before the answer came" if path == "/slow" else "during the response"
    assert t["error"] == f"the client went away {when}", t


def _half_closed_get(stack: Stack, origin: int, container: str) -> bytes:
    """GET /quick, then shutdown(SHUT_WR) at once; whatever comes back until the proxy closes."""
    with socket.create_connection(("127.0.0.1", stack.ports["http-proxy"]), timeout=10) as s:
        s.sendall(
            b"GET http://%s:%d/quick?%s HTTP/1.1\r\nHost: %s:%d\r\nProxy-Authorization: Basic %s\r\n\r\n"
            % (HOST.encode(), origin, container.encode(), HOST.encode(), origin, _basic(container))
        )
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            try:
                data = s.recv(4096)
            except ConnectionResetError:
                break
            if not data:
                break
            out += data
        return out


def _basic(user: str) -> bytes:
    import base64

    return base64.b64encode(f"{user}:x".encode())


def test_a_half_closed_client_is_taken_as_gone_by_default(stack: Stack, origin: int) -> None:
    assert _half_closed_get(stack, origin, "leave-half") == b""
    assert _transaction(stack, "leave-half")["error"] == "the client went away before the answer came"


def test_half_closed_clients_are_answered_when_configured(make_stack, origin: int) -> None:
    stack = make_stack(proxy={"halfClosedClients": True})
    add_rule(stack, container_pattern="*", destination_pattern=HOST, port_pattern="*", action="allow")
    out = _half_closed_get(stack, origin, "half-kept")
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"quick answer\n"), out
    t = _transaction(stack, "half-kept")
    assert t["status_code"] == 200 and t["error"] is None


def _tx_queue(local_port: int, remote_port: int) -> int:
    """Bytes the socket 127.0.0.1:local_port → 127.0.0.1:remote_port has in its kernel send queue
    (written by its process, not yet taken by the peer), from /proc/net/tcp."""
    want = (f"0100007F:{local_port:04X}", f"0100007F:{remote_port:04X}")
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if (f[1], f[2]) == want:
            return int(f[4].split(":")[0], 16)
    raise AssertionError(f"no socket {want} in /proc/net/tcp")


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the proxy's send queue from /proc/net/tcp")
def test_a_cut_download_records_the_bytes_the_client_was_handed(stack: Stack, origin: int) -> None:
    """A client that reads part of a large download, stops reading (the proxy's writes back up in
    its transport), then closes: the record's response_body_size is what left the proxy for the
    client (read by it, in its socket's queue, in the proxy socket's queue), not what was read
    from the origin, and the record says the client went away."""
    import fcntl
    import termios

    container = "leave-cut-download"
    proxy_port = stack.ports["http-proxy"]
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)  # (a small window: little in flight)
    s.settimeout(10)
    s.connect(("127.0.0.1", proxy_port))
    try:
        s.sendall(
            b"GET http://%s:%d/big?%s HTTP/1.1\r\nHost: %s:%d\r\nProxy-Authorization: Basic %s\r\n\r\n"
            % (HOST.encode(), origin, container.encode(), HOST.encode(), origin, _basic(container))
        )
        got = b""
        while b"\r\n\r\n" not in got:
            data = s.recv(65536)
            assert data, got
            got += data
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        read = len(body)
        while read < (1 << 20):
            data = s.recv(65536)
            assert data
            read += len(data)
        time.sleep(1.5)  # not reading: the proxy's writes back up (its socket's queue, then its transport)
        queued = _int(fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0\0\0\0"))
        in_flight = _tx_queue(proxy_port, s.getsockname()[1])
    finally:
        s.close()  # unread bytes: a reset
    handed = read + queued + in_flight
    t = _transaction(stack, container, f"/big?{container}")
    assert t["status_code"] == 200 and t["error"] == "the client went away during the response", t
    # (a lower bound when the client reset its connection: its transport's buffer as of the proxy's
    # last write to it, emptied by the reset)
    assert 0 < t["response_body_size"] <= handed < BIG, (t["response_body_size"], read, queued, in_flight)


def _int(raw: bytes) -> int:
    import struct

    return int(struct.unpack("i", raw)[0])
