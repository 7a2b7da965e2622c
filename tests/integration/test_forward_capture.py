"""Transaction recording of plain-HTTP requests through the HTTP forward proxy (SPEC §7: the
per-request pipeline applies to them as inside an intercepted tunnel), and the recording relay's
idle rule (a relay closes only when BOTH directions have been quiet for idleTimeout).

The origins (HTTP and WebSocket) listen on 127.0.0.1, which the builtin loopback rule allows for
every identity. Clients: curl (`-x`, absolute-URI requests, no `-p`), httpx, raw sockets for a
WebSocket upgrade in absolute form, and the `websockets` client (which tunnels ws:// through
CONNECT, so its frames go through the interception path).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import JsonEchoHandler, Stack, curl, plain_origin, proxy_url, wait_for, websocket_origin

pytestmark = [pytest.mark.stack, pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required")]

HOST = "127.0.0.1"
IDLE = 2  # proxy.idleTimeout of this module's stack (seconds)
SECRET = "sk-fwd-" + "7c1e5a" * 4  # never stored anywhere
JSON_BODY = {"ok": True, "items": [1, 2, 3]}
STREAM_EVERY = 0.4
STREAM_FOR = 3 * IDLE  # a one-way stream three idle periods long


# ---------------------------------------------------------------- origins


class _Origin(JsonEchoHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.startswith("/json"):
            self.reply(json.dumps(JSON_BODY).encode(), "application/json", Set_Cookie="sid=origin-cookie")
        elif self.path.startswith("/binary"):
            self.reply(bytes(range(256)) * 4, "application/octet-stream")
        else:
            # Which origin-side connection served it: equal ports = one kept-alive upstream connection.
            self.reply(f"peer {self.client_address[1]}\n".encode(), "text/plain")


@pytest.fixture(scope="module")
def origin() -> Iterator[int]:
    with plain_origin(_Origin, HOST) as port:
        yield port


async def _ws_handler(ws) -> None:  # noqa: ANN001
    """/stream sends a message every STREAM_EVERY s for STREAM_FOR s and then stays open without a
    word (until the peer goes); any other path echoes each message."""
    if ws.request.path.startswith("/stream"):
        n = int(STREAM_FOR / STREAM_EVERY)
        for i in range(n):
            await ws.send(f"tick {i}")
            await asyncio.sleep(STREAM_EVERY)
        await ws.send("end")
        await ws.wait_closed()
        return
    async for msg in ws:
        await ws.send(msg)


@pytest.fixture(scope="module")
def ws_origin() -> Iterator[int]:
    with websocket_origin(_ws_handler, HOST, ping_interval=None, compression=None) as port:
        yield port


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack({"proxy": {"idleTimeout": IDLE, "holdTimeout": 2}}) as s:
        yield s


# ---------------------------------------------------------------- helpers


def _transactions(stack: Stack, **params: Any) -> list[dict]:
    r = stack.get("/api/transactions", params={"limit": 200, **params})
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    # ?container= is a substring (as in the reference): keep this container's own rows only.
    return [i for i in items if "container" not in params or i["container_name"] == params["container"]]


def _wait_transactions(stack: Stack, container: str, n: int, method: str | None = None) -> list[dict]:
    def enough() -> list[dict] | None:
        items = [t for t in _transactions(stack, container=container) if method is None or t["method"] == method]
        return items if len(items) >= n else None

    return wait_for(enough, 10, message=f"{n} transactions of {container}")


def _detail(stack: Stack, item: dict) -> dict:
    r = stack.get(f"/api/transactions/{item['id']}")
    assert r.status_code == 200, r.text
    return r.json()


def _header(headers: dict[str, list[str]], name: str) -> list[str] | None:
    for k, v in headers.items():
        if k.lower() == name.lower():
            return v
    return None


def _assert_secret_not_stored(stack: Stack, *secrets: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        path = Path(f"{stack.db_path}{suffix}")
        if path.exists():
            data = path.read_bytes()
            for secret in secrets:
                assert secret.encode() not in data, f"{secret!r} found in {path}"


class _RawWs:
    """A WebSocket client on a raw socket, upgrading with an absolute-URI request to the HTTP proxy
    (the forward-proxy path, no CONNECT). Small frames only."""

    def __init__(self, stack: Stack, container: str, url: str, extra_headers: str = "") -> None:
        self.sock = socket.create_connection(("127.0.0.1", stack.ports["http-proxy"]), timeout=10)
        auth = base64.b64encode(f"{container}:x".encode()).decode()
        authority = url.split("/")[2]
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {url} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nProxy-Authorization: Basic {auth}\r\n"
            f"{extra_headers}\r\n".encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            assert chunk, self.buf
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        self.status_line = head.split(b"\r\n", 1)[0]

    def send(self, payload: bytes, opcode: int = 0x1) -> None:
        mask = os.urandom(4)
        assert len(payload) < 126
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def _need(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self) -> tuple[int, bytes]:
        b0, b1 = self._need(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._need(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._need(8))[0]
        return b0 & 0x0F, self._need(n)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send(struct.pack("!H", 1000), opcode=0x8)
        self.sock.close()


# ---------------------------------------------------------------- tests


def test_plain_get_and_json_post_are_recorded_with_headers_redacted(stack: Stack, origin: int) -> None:
    proxy = ["-x", proxy_url(stack, "fwd-agent", "x")]
    code, out, err = curl(
        *proxy,
        f"http://{HOST}:{origin}/json?q=1",
        "-H",
        f"Authorization: Bearer {SECRET}",
        "-H",
        f"X-Api-Key: {SECRET}",
        "-H",
        "X-Plain: visible",
    )
    assert code == 0, err
    assert json.loads(out) == JSON_BODY
    post = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    code, out, err = curl(
        *proxy,
        f"http://{HOST}:{origin}/echo",
        "-H",
        "Content-Type: application/json",
        "-H",
        f"Authorization: Bearer {SECRET}",
        "--data-binary",
        json.dumps(post),
    )
    assert code == 0, err
    assert json.loads(out) == {"echo": post}

    items = _wait_transactions(stack, "fwd-agent", 2)
    get = _detail(stack, next(t for t in items if t["method"] == "GET"))
    assert get["url"] == f"http://{HOST}:{origin}/json?q=1"
    assert get["destination_host"] == HOST and get["destination_port"] == origin
    assert get["status_code"] == 200 and get["result"] == "allowed"
    assert _header(get["request_headers"], "Authorization") == ["[REDACTED]"]
    assert _header(get["request_headers"], "X-Api-Key") == ["[REDACTED]"]
    assert _header(get["request_headers"], "Proxy-Authorization") == ["[REDACTED]"]
    assert _header(get["request_headers"], "X-Plain") == ["visible"]
    assert _header(get["request_headers"], "User-Agent")[0].startswith("curl/")
    assert _header(get["response_headers"], "Set-Cookie") == ["[REDACTED]"]
    assert get["response_content_type"] == "application/json"
    assert json.loads(get["response_body"]) == JSON_BODY
    assert get["response_body_size"] == len(json.dumps(JSON_BODY)) and get["request_body_size"] == 0
    assert get["request_body"] is None
    assert get["duration_us"] > 0 and type(get["duration_ms"]) is int and get["substituted_credentials"] == []

    pst = _detail(stack, next(t for t in items if t["method"] == "POST"))
    assert pst["url"] == f"http://{HOST}:{origin}/echo" and pst["status_code"] == 200
    assert pst["request_content_type"] == "application/json"
    assert json.loads(pst["request_body"]) == post and pst["request_body_size"] == len(json.dumps(post))
    assert json.loads(pst["response_body"]) == {"echo": post}
    assert pst["response_body_size"] == len(json.dumps({"echo": post}))
    assert _header(pst["request_headers"], "Authorization") == ["[REDACTED]"]

    # The list filters work on these records as on intercepted ones; bodies only on request.
    listed = _transactions(stack, container="fwd-agent", method="POST", destination="127.0.0")
    assert [t["id"] for t in listed] == [pst["id"]] and "request_body" not in listed[0]
    # The request log still has its own entry per request (method HTTP).
    logs = [
        x
        for x in stack.get("/api/logs", params={"container": "fwd-agent"}).json()["items"]
        if x["container_name"] == "fwd-agent"
    ]
    assert logs and all(x["method"] == "HTTP" for x in logs)
    _assert_secret_not_stored(stack, SECRET, "origin-cookie")


def test_binary_body_counted_not_stored(stack: Stack, origin: int) -> None:
    code, out, err = curl("-x", proxy_url(stack, "fwd-binary", "x"), f"http://{HOST}:{origin}/binary")
    assert code == 0 and len(out) == 1024, err
    t = _detail(stack, _wait_transactions(stack, "fwd-binary", 1)[0])
    assert t["response_body"] is None and t["response_body_size"] == 1024
    assert t["response_content_type"] == "application/octet-stream"


def test_keep_alive_connection_gives_one_record_per_request(stack: Stack, origin: int) -> None:
    with httpx.Client(proxy=proxy_url(stack, "fwd-keepalive", "x"), timeout=10, trust_env=False) as client:
        first = client.get(f"http://{HOST}:{origin}/one", headers={"Authorization": f"Bearer {SECRET}"})
        second = client.get(f"http://{HOST}:{origin}/two")
    assert first.status_code == second.status_code == 200
    assert first.text == second.text  # one client connection, hence one kept-alive upstream connection
    items = _wait_transactions(stack, "fwd-keepalive", 2)
    assert len(items) == 2
    assert sorted(t["url"] for t in items) == [f"http://{HOST}:{origin}/one", f"http://{HOST}:{origin}/two"]
    details = [_detail(stack, t) for t in items]
    assert all(d["status_code"] == 200 and d["response_body"] == first.text for d in details)
    _assert_secret_not_stored(stack, SECRET)


@pytest.mark.parametrize("closing", ["HTTP/1.1 with Connection: close", "HTTP/1.0"])
def test_a_request_pipelined_after_a_closing_one_never_goes_upstream(stack: Stack, origin: int, closing: str) -> None:
    """A request head that closes its connection ends it: bytes pipelined after it are not read as a
    next request (the proxy's kept request parsers are lenient about keep-alive; the connection's
    own reading of the head closes it), neither sent to the origin nor recorded."""
    container = "fwd-closepipe-10" if closing == "HTTP/1.0" else "fwd-closepipe-11"
    auth = base64.b64encode(f"{container}:x".encode()).decode()
    first = (
        f"GET http://{HOST}:{origin}/first HTTP/1.0\r\nHost: {HOST}:{origin}\r\n"
        if closing == "HTTP/1.0"
        else f"GET http://{HOST}:{origin}/first HTTP/1.1\r\nHost: {HOST}:{origin}\r\nConnection: close\r\n"
    )
    second = f"GET http://{HOST}:{origin}/second HTTP/1.1\r\nHost: {HOST}:{origin}\r\n"
    with socket.create_connection((HOST, stack.ports["http-proxy"]), timeout=10) as sock:
        sock.sendall(
            f"{first}Proxy-Authorization: Basic {auth}\r\n\r\n{second}Proxy-Authorization: Basic {auth}\r\n\r\n".encode()
        )
        got = b""
        while chunk := sock.recv(65536):  # the proxy closes after the first answer
            got += chunk
    assert got.count(b"HTTP/1.") == 1 and got.startswith(b"HTTP/1.") and b" 200 " in got.split(b"\r\n", 1)[0], got
    items = _wait_transactions(stack, container, 1)
    time.sleep(0.5)  # (a second record, were there one, is written by then: the first already was)
    urls = [t["url"] for t in _transactions(stack, container=container)]
    assert urls == [f"http://{HOST}:{origin}/first"], urls
    assert len(items) == 1


def test_blocked_request_is_recorded(stack: Stack, origin: int) -> None:
    r = stack.request(
        "POST",
        "/api/rules",
        json={
            "container_pattern": "fwd-denied",
            "destination_pattern": HOST,
            "port_pattern": str(origin),
            "action": "deny",
        },
    )
    assert r.status_code == 201, r.text
    code, out, err = curl(
        "-x",
        proxy_url(stack, "fwd-denied", "x"),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        f"http://{HOST}:{origin}/nope",
    )
    assert out == b"403", (code, out, err)
    t = _wait_transactions(stack, "fwd-denied", 1)[0]
    assert t["status_code"] == 403 and t["result"] == "blocked" and t["method"] == "GET"
    assert t["rule_id"] == r.json()["id"]


def test_a_host_field_naming_another_host_is_recorded_and_flagged(stack: Stack, origin: int) -> None:
    """SPEC §7: `request_host` is the request's Host header and `host_mismatch` flags one naming
    another host than the one contacted, on the forward proxy as in a tunnel (once it was the
    absolute URI's host, so the mismatch never showed)."""
    auth = base64.b64encode(b"fwd-hostfield:x").decode()
    heads = [
        f"GET http://{HOST}:{origin}/same HTTP/1.1\r\nHost: {HOST.upper()}:{origin}\r\n",  # the same host
        f"GET http://{HOST}:{origin}/other HTTP/1.1\r\nHost: elsewhere.example:{origin}\r\n",
    ]
    with socket.create_connection((HOST, stack.ports["http-proxy"]), timeout=10) as sock:
        for head in heads:
            sock.sendall(f"{head}Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
            got = b""
            while b"\r\n\r\n" not in got:
                chunk = sock.recv(65536)
                assert chunk, got
                got += chunk
            assert got.startswith(b"HTTP/1.1 200"), got
            fields, _, body = got.partition(b"\r\n\r\n")
            length = int(fields.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(body) < length:  # (the whole answer, before the next request is read back)
                chunk = sock.recv(65536)
                assert chunk, got
                body += chunk
    by_url = {t["url"]: t for t in _wait_transactions(stack, "fwd-hostfield", 2)}
    same, other = by_url[f"http://{HOST}:{origin}/same"], by_url[f"http://{HOST}:{origin}/other"]
    assert (same["request_host"], same["host_mismatch"]) == (HOST, False)
    assert (other["request_host"], other["host_mismatch"]) == ("elsewhere.example", True)
    assert other["destination_host"] == HOST  # contacted and judged: the absolute URI's host


def test_websocket_upgrade_through_the_forward_proxy_is_relayed_and_recorded(stack: Stack, ws_origin: int) -> None:
    url = f"http://{HOST}:{ws_origin}/echo"
    ws = _RawWs(stack, "fwd-ws", url, extra_headers=f"Authorization: Bearer {SECRET}\r\n")
    try:
        assert ws.status_line.startswith(b"HTTP/1.1 101"), ws.status_line
        ws.send(b"hello through the forward proxy")
        assert ws.recv() == (0x1, b"hello through the forward proxy")
        ws.send(b'{"type": "ping", "n": 1}')
        assert ws.recv() == (0x1, b'{"type": "ping", "n": 1}')
        ws.send(b"\x00\x01\x02bin", opcode=0x2)
        assert ws.recv() == (0x2, b"\x00\x01\x02bin")
    finally:
        ws.close()

    frames = [t for t in _wait_transactions(stack, "fwd-ws", 7) if t["method"] in ("WS_REQ", "WS_RESP")]
    assert len(frames) == 6
    assert all(t["url"] == f"ws://{HOST}:{ws_origin}/echo" for t in frames)
    assert all(t["destination_host"] == HOST and t["destination_port"] == ws_origin for t in frames)
    detail = [_detail(stack, t) for t in frames]
    sent = sorted(d["request_body"] for d in detail if d["method"] == "WS_REQ" and d["request_body"])
    echoed = sorted(d["response_body"] for d in detail if d["method"] == "WS_RESP" and d["response_body"])
    assert sent == echoed == sorted(["hello through the forward proxy", '{"type": "ping", "n": 1}'])
    assert any(d["request_body"] is None and d["request_body_size"] == 6 for d in detail if d["method"] == "WS_REQ")
    upgrade = next(t for t in _transactions(stack, container="fwd-ws") if t["method"] == "GET")
    assert upgrade["status_code"] == 101 and upgrade["url"] == url
    assert _header(upgrade["request_headers"], "Authorization") == ["[REDACTED]"]
    _assert_secret_not_stored(stack, SECRET)


def test_one_way_stream_outlives_idle_timeout_through_the_forward_proxy(stack: Stack, ws_origin: int) -> None:
    ws = _RawWs(stack, "fwd-stream", f"http://{HOST}:{ws_origin}/stream")
    try:
        assert ws.status_line.startswith(b"HTTP/1.1 101"), ws.status_line
        ws.sock.settimeout(IDLE * 2)
        got = []
        while True:
            _op, payload = ws.recv()
            got.append(payload.decode())
            if payload == b"end":
                break
        assert got == [f"tick {i}" for i in range(int(STREAM_FOR / STREAM_EVERY))] + ["end"]
        # Now both directions are quiet: the relay closes after idleTimeout (give it some slack).
        t0 = time.monotonic()
        ws.sock.settimeout(IDLE * 4)
        with pytest.raises(ConnectionError):
            ws.recv()
        assert time.monotonic() - t0 < IDLE * 3
    finally:
        ws.sock.close()


def test_one_way_stream_outlives_idle_timeout_in_an_intercepted_tunnel(stack: Stack, ws_origin: int) -> None:
    """The interception relay (ws:// through CONNECT, plain HTTP inside the tunnel): one quiet direction
    must not end a stream that is busy the other way."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with connect(
        f"ws://{HOST}:{ws_origin}/stream",
        proxy=proxy_url(stack, "mitm-stream", "x"),
        open_timeout=10,
        ping_interval=None,
        compression=None,
    ) as ws:
        got = []
        while True:
            msg = ws.recv(timeout=IDLE * 2)
            got.append(msg)
            if msg == "end":
                break
        assert got == [f"tick {i}" for i in range(int(STREAM_FOR / STREAM_EVERY))] + ["end"]
        t0 = time.monotonic()
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=IDLE * 4)
        assert time.monotonic() - t0 < IDLE * 3
    frames = _wait_transactions(stack, "mitm-stream", len(got), method="WS_RESP")
    assert all(t["url"] == f"ws://{HOST}:{ws_origin}/stream" for t in frames)
    log = [
        x
        for x in stack.get("/api/logs", params={"container": "mitm-stream"}).json()["items"]
        if x["container_name"] == "mitm-stream"
    ]
    assert log and log[0]["method"] == "CONNECT" and log[0]["mitm_skip_reason"] is None
