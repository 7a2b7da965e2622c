"""Plain tunnels through the real stack: a tunnel whose two ends have both closed releases its
descriptors at once (the new-tunnels/s bench once leaked two per tunnel until the proxy ran out).

Raw sockets on both ends; the origin listens on 127.0.0.1 (the builtin allow rule covers it). The
client's first bytes are neither TLS nor HTTP, so interception never takes the tunnel over.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Stack, wait_for

pytestmark = [
    pytest.mark.stack,
    pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to count descriptors"),
]

TUNNELS = 60


class _Origin:
    """Accepts, reads one chunk, answers and closes (like an HTTP/1.1 server after `Connection: close`);
    with half_close_first it waits for the client's FIN before answering and closing."""

    def __init__(self, half_close_first: bool = False) -> None:
        self.half_close_first = half_close_first
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.sock.getsockname()[1]
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                data = conn.recv(4096)
                if self.half_close_first:
                    while conn.recv(4096):
                        pass
                conn.sendall(b"pong:" + data)
            except OSError:
                pass

    def close(self) -> None:
        self.stopping = True
        self.sock.close()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = Stack({"proxy": {"headerTimeout": 5}})
    s.start()
    try:
        yield s
    finally:
        s.cleanup()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _tunnel(proxy_port: int, origin_port: int, client_half_closes: bool) -> bytes:
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    try:
        s.sendall(f"CONNECT 127.0.0.1:{origin_port} HTTP/1.1\r\nHost: 127.0.0.1:{origin_port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            assert chunk, f"proxy closed before answering CONNECT: {head!r}"
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head
        s.sendall(b"ping\n")
        if client_half_closes:
            s.shutdown(socket.SHUT_WR)
        out = head.split(b"\r\n\r\n", 1)[1]
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return out
            out += chunk
    finally:
        s.close()


@pytest.mark.parametrize("origin_closes_first", [True, False], ids=["origin-closes-first", "client-closes-first"])
def test_closed_tunnels_release_descriptors(stack: Stack, origin_closes_first: bool) -> None:
    origin = _Origin(half_close_first=not origin_closes_first)
    try:
        pid = stack.pid("proxy")
        assert pid is not None
        port = stack.ports["http-proxy"]
        _tunnel(port, origin.port, not origin_closes_first)  # warm up (lazy imports, first descriptors)
        time.sleep(0.3)
        before = _fds(pid)
        for _ in range(TUNNELS):
            assert _tunnel(port, origin.port, not origin_closes_first) == b"pong:ping\n"
        # Both ends of every tunnel are closed: the proxy must let go of both descriptors (no timeout
        # is involved: the idle timeout is minutes long).
        wait_for(
            lambda: _fds(pid) <= before + 4,
            5,
            message=f"proxy descriptors back near {before} after {TUNNELS} closed tunnels",
        )
    finally:
        origin.close()


class _EchoOrigin:
    """Echoes every byte back (one thread per connection) until the client half-closes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                while True:
                    data = conn.recv(1 << 16)
                    if not data:
                        return
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def _echo_through_tunnel(proxy_port: int, origin_port: int, size: int, seed: int, out: dict) -> None:
    """Send `size` pseudo-random bytes through a tunnel to the echo origin while reading the echo
    back slowly at first (so the proxy's writes are partial and its queues fill); compare digests."""
    import hashlib
    import random

    rng = random.Random(seed)
    block = rng.randbytes(1 << 20)
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=30)
    try:
        s.sendall(f"CONNECT 127.0.0.1:{origin_port} HTTP/1.1\r\nHost: 127.0.0.1:{origin_port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        assert head.startswith(b"HTTP/1.1 200"), head
        sent_hash = hashlib.sha256()

        def send() -> None:
            left, i = size, 0
            while left:
                # Vary the pieces so chunk edges fall everywhere.
                piece = block[(i * 7919) % 4096 :][: min(left, 65536 + (i * 104729) % 300_000)]
                sent_hash.update(piece)
                s.sendall(piece)
                left -= len(piece)
                i += 1
            s.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        got_hash, got = hashlib.sha256(), 0
        time.sleep(0.3)  # let the proxy's write queue towards us fill up first
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            got_hash.update(chunk)
            got += len(chunk)
            if got < 4 << 20:
                time.sleep(0.001)  # a slow reader for the first megabytes
        sender.join(30)
        out[seed] = (got, got_hash.hexdigest() == sent_hash.hexdigest())
    finally:
        s.close()


def test_tunnel_relays_every_byte_in_order_under_backpressure(stack: Stack) -> None:
    """Reads share one scratch buffer and go to the peer socket directly when they can: what reaches
    the other end must be exactly what was sent, in order, both ways, with two tunnels at once."""
    origin = _EchoOrigin()
    try:
        size = 48 << 20
        out: dict[int, tuple[int, bool]] = {}
        threads = [
            threading.Thread(
                target=_echo_through_tunnel, args=(stack.ports["http-proxy"], origin.port, size, seed, out), daemon=True
            )
            for seed in (1, 2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert out == {1: (size, True), 2: (size, True)}
    finally:
        origin.close()
