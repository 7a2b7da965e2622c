"""The API's front door bounds what one local client can hold (services/api/server.py), with a
real uvicorn server on loopback: a request that never completes is closed at its deadline, past
the connection cap a new connection is dropped at accept, and a /ws client that stopped reading
is disconnected for real (its TCP connection ends), not left open with a full send buffer.

Before: no deadline before or inside a request, no cap (an outside run held 20 000 connections,
the API's descriptor limit, and every API call failed), and a "disconnected" non-reading /ws
client kept its socket (and 2 MB of send buffer) until the client itself went away."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from typing import Any

import pytest
import uvicorn

from services.api import server as front


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
    elif scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        try:
            for _ in range(20_000):  # a flood the client does not read: the socket fills up
                await asyncio.wait_for(send({"type": "websocket.send", "text": "x" * 4096}), 0.5)
        except TimeoutError:
            pass
        await send({"type": "websocket.close", "code": 1008})


@contextlib.contextmanager
def _serving() -> Any:
    """The server on its own loop in a thread; the clients here block as real ones do."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        _app,
        loop="none",
        lifespan="off",
        http=front.StrictHttpProtocol,
        ws=front.WebSocketProtocol,
        log_level="warning",
        ws_ping_interval=None,
    )
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # (not the main thread)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


def _closed_within(s: socket.socket, seconds: float) -> float:
    """Seconds until the server ends `s` (EOF or reset); AssertionError past `seconds`."""
    t0 = time.monotonic()
    s.settimeout(0.2)
    while time.monotonic() - t0 < seconds:
        try:
            data = s.recv(1 << 20)
        except TimeoutError:
            continue
        except ConnectionError:
            return time.monotonic() - t0
        if not data:
            return time.monotonic() - t0
    raise AssertionError(f"still open after {seconds} s")


def test_a_request_that_never_completes_is_closed_at_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(front, "REQUEST_DEADLINE", 0.5)
    with _serving() as port:
        silent = socket.create_connection(("127.0.0.1", port))
        slow_head = socket.create_connection(("127.0.0.1", port))
        slow_head.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
        slow_body = socket.create_connection(("127.0.0.1", port))
        slow_body.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n{")
        kept = socket.create_connection(("127.0.0.1", port), timeout=5)  # answered, then the next begins slowly
        kept.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert kept.recv(4096).startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET / HT")
        for s in (silent, slow_head, slow_body, kept):
            took = _closed_within(s, 5.0)
            assert took < 2.0, took
            s.close()
        quick = socket.create_connection(("127.0.0.1", port), timeout=5)  # a whole request is answered as ever
        quick.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert quick.recv(4096).startswith(b"HTTP/1.1 200")
        quick.close()


def test_past_the_cap_a_new_connection_is_dropped_at_accept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(front, "MAX_CONNECTIONS", 3)
    with _serving() as port:
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", port))
        assert _closed_within(extra, 2.0) < 2.0
        extra.close()
        held.pop().close()
        time.sleep(0.2)
        again = socket.create_connection(("127.0.0.1", port), timeout=5)  # room again
        again.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert again.recv(4096).startswith(b"HTTP/1.1 200")
        for s in [again, *held]:
            s.close()


def test_a_ws_client_that_stopped_reading_is_disconnected_for_real() -> None:
    from websockets.sync.client import connect

    with _serving() as port:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        client_port = sock.getsockname()[1]
        still_open = True
        with (
            contextlib.suppress(Exception),
            connect(f"ws://127.0.0.1:{port}/", sock=sock, max_queue=1, compression=None),
        ):
            # The client reads nothing: the app's sends stall, it closes, and the connection ends.
            # (Before: the server's socket stayed ESTABLISHED with its send buffer full.)
            deadline = time.monotonic() + 8
            while still_open and time.monotonic() < deadline:
                time.sleep(0.1)
                still_open = _server_side_open(port, client_port)
        assert not still_open, "the server kept the connection"


def _server_side_open(server_port: int, client_port: int) -> bool:
    """Whether the server's end of the connection (local server_port, remote client_port) is open
    (/proc/net/tcp: ESTABLISHED or CLOSE_WAIT)."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            local, remote, state = parts[1], parts[2], parts[3]
            if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
                return state in ("01", "08")
    return False
