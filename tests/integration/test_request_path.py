"""The request path end to end (issue 12 items 1-3, issue 13 item 3): the same exchange on the
forward proxy and inside intercepted tunnels, origin faults answered as the origin's (502, a
record with the error, the client connection kept), a request hook's secret reaching the origin
and nothing else, and records naming the host actually contacted.

Origins: plain HTTP on 127.0.0.1 (allowed by the builtin loopback rule) and HTTPS on 127.0.0.6
with a trustme certificate the proxy trusts through `mitm.upstreamCaFile`. The stack runs the
test hook of `hooks_for_tests.py` (GREYPROXY_TEST_REQUEST_HOOKS), which adds a header with a secret
to every request sent upstream.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from hooks_for_tests import HEADER, SECRET
from websockets.sync.client import connect as ws_connect

import harness
from conftest import Stack, https_origin, intercepting_stack, service_env, wait_for

pytestmark = [pytest.mark.stack, pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required")]

PLAIN = "127.0.0.1"
TLS = "127.0.0.6"  # an address no builtin rule covers: the module's stack allows it
SPOOF = "api.openai.com"
RECEIVED: list[dict[str, str]] = []  # what the origins received: (path, headers) of each request
LONG_HEAD = b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70_000 + b"\r\nContent-Length: 2\r\n\r\nok"  # > maxHeaderBytes
BAD_CHUNK = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nhello\r\n0\r\n\r\n"
)


class _Origin(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        RECEIVED.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        if self.path.startswith("/zzz"):
            self.wfile.write(BAD_CHUNK)  # one write: the head and the broken chunk arrive together
            self.close_connection = True
            return
        if self.path.startswith("/long-head"):
            self.wfile.write(LONG_HEAD)
            self.close_connection = True
            return
        body = json.dumps({"path": self.path, "host": self.headers.get("Host")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def plain_origin() -> Iterator[int]:
    with harness.plain_origin(_Origin, PLAIN) as port:
        yield port


@pytest.fixture(scope="module")
def tls_origin(origin_ca: trustme.CA) -> Iterator[int]:
    with https_origin(origin_ca, TLS, _Origin) as port:
        yield port


@pytest.fixture(scope="module")
def stack(origin_ca_file: Path) -> Iterator[Stack]:
    here = str(Path(__file__).resolve().parent)
    hooks = {
        "PYTHONPATH": os.pathsep.join([service_env()["PYTHONPATH"], here]),
        "GREYPROXY_TEST_REQUEST_HOOKS": "hooks_for_tests:hooks",
    }
    with intercepting_stack({"proxy": {"holdTimeout": 2}}, origin_ca_file, allow=(TLS,), env=hooks) as s:
        yield s


# ---------------------------------------------------------------- helpers


def _curl(*args: str, timeout: int = 20) -> tuple[int, bytes, str]:
    p = subprocess.run(
        ["curl", "-s", "-S", "--max-time", str(timeout), *args], capture_output=True, timeout=timeout + 5
    )
    return p.returncode, p.stdout, p.stderr.decode(errors="replace")


def _proxy(stack: Stack, container: str) -> str:
    return f"http://{container}:x@127.0.0.1:{stack.ports['http-proxy']}"


def _gp_ca(stack: Stack) -> str:
    return str(stack.data_dir / "ca-cert.pem")


def _transactions(stack: Stack, container: str, n: int = 1) -> list[dict[str, Any]]:
    def got() -> list[dict[str, Any]] | None:
        items = stack.get("/api/transactions", params={"container": container, "limit": 100}).json()["items"]
        return items if len(items) >= n else None

    items = wait_for(got, 10, message=f"{n} transaction(s) of {container}")
    return sorted(items, key=lambda t: t["id"])


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def _read_response(sock: socket.socket | ssl.SSLSocket) -> tuple[int, dict[str, str], bytes]:
    resp = http.client.HTTPResponse(sock)  # type: ignore[arg-type]
    resp.begin()
    body = resp.read()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def _connect_tunnel(stack: Stack, container: str, host: str, port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", stack.ports["http-proxy"]), timeout=10)
    auth = base64.b64encode(f"{container}:x".encode()).decode()
    sock.sendall(
        f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1024)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


# ---------------------------------------------------------------- origin faults


def test_bad_chunk_size_is_a_502_with_a_record_on_the_forward_path(stack: Stack, plain_origin: int) -> None:
    code, out, err = _curl(
        "-x", _proxy(stack, "fault-fwd"), "-w", "%{http_code}", "-o", "/dev/null", f"http://{PLAIN}:{plain_origin}/zzz"
    )
    assert out == b"502", (code, out, err)
    t = _transactions(stack, "fault-fwd")[0]
    assert t["status_code"] == 502 and "malformed chunk size" in t["error"], t
    assert t["result"] == "allowed" and t["url"] == f"http://{PLAIN}:{plain_origin}/zzz"

    # The client connection stays usable: the next request on it is served.
    sock = socket.create_connection(("127.0.0.1", stack.ports["http-proxy"]), timeout=10)
    with sock:
        auth = base64.b64encode(b"fault-keep:x").decode()
        for path, want in (("/zzz", 502), ("/ok", 200)):
            sock.sendall(
                f"GET http://{PLAIN}:{plain_origin}{path} HTTP/1.1\r\nHost: {PLAIN}:{plain_origin}\r\n"
                f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode()
            )
            status, headers, body = _read_response(sock)
            assert status == want, (path, status, body)
            if want == 502:
                assert b"bad response from upstream: malformed chunk size line" in body
                assert headers.get("connection") != "close"


def test_bad_chunk_size_is_a_502_with_a_record_inside_an_intercepted_tunnel(stack: Stack, tls_origin: int) -> None:
    code, out, err = _curl(
        "--cacert",
        _gp_ca(stack),
        "-p",
        "-x",
        _proxy(stack, "fault-mitm"),
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        f"https://{TLS}:{tls_origin}/zzz",
    )
    assert out == b"502", (code, out, err)
    t = _transactions(stack, "fault-mitm")[0]
    assert t["status_code"] == 502 and "malformed chunk size" in t["error"], t
    assert t["url"] == f"https://{TLS}:{tls_origin}/zzz" and t["destination_host"] == TLS

    # Same connection, next request: served (a new upstream connection behind it).
    ctx = ssl.create_default_context(cafile=_gp_ca(stack))
    with ctx.wrap_socket(_connect_tunnel(stack, "fault-mitm-keep", TLS, tls_origin), server_hostname=TLS) as tls:
        for path, want in (("/zzz", 502), ("/ok", 200)):
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {TLS}:{tls_origin}\r\n\r\n".encode())
            status, _headers, body = _read_response(tls)
            assert status == want, (path, status, body)


def test_an_over_long_response_head_is_a_502_on_both_paths(stack: Stack, plain_origin: int, tls_origin: int) -> None:
    code, out, err = _curl(
        "-x",
        _proxy(stack, "long-fwd"),
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        f"http://{PLAIN}:{plain_origin}/long-head",
    )
    assert out == b"502", (code, out, err)
    code, out, err = _curl(
        "--cacert",
        _gp_ca(stack),
        "-p",
        "-x",
        _proxy(stack, "long-mitm"),
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        f"https://{TLS}:{tls_origin}/long-head",
    )
    assert out == b"502", (code, out, err)
    for container in ("long-fwd", "long-mitm"):
        t = _transactions(stack, container)[0]
        assert t["status_code"] == 502 and "response head too large" in t["error"], t


# ---------------------------------------------------------------- a hook's secret goes upstream only


def _everything_written(stack: Stack) -> dict[str, bytes]:
    files = {"serve.log": stack.serve_log}
    files.update({p.name: p for p in (stack.data_dir / "logs").glob("*")})
    for suffix in ("", "-wal", "-shm"):
        files[f"db{suffix}"] = Path(f"{stack.db_path}{suffix}")
    return {name: p.read_bytes() for name, p in files.items() if p.is_file()}


def test_a_hooks_secret_reaches_the_origin_and_nothing_else(stack: Stack, plain_origin: int, tls_origin: int) -> None:
    events: list[str] = []
    listening = threading.Event()
    stop = threading.Event()

    def watch() -> None:
        url = stack.api.replace("http://", "ws://", 1) + "/ws"
        with ws_connect(url, open_timeout=5) as ws:
            ws.recv(timeout=5)  # the greeting
            listening.set()
            while not stop.is_set():
                try:
                    events.append(str(ws.recv(timeout=0.2)))
                except TimeoutError:
                    continue

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert listening.wait(10)
    time.sleep(0.3)  # the API subscribes to the per-request topics once a /ws client is there
    try:
        code, out, err = _curl("-x", _proxy(stack, "hook-fwd"), f"http://{PLAIN}:{plain_origin}/hook-fwd")
        assert code == 0 and json.loads(out)["path"] == "/hook-fwd", (out, err)
        code, out, err = _curl(
            "--cacert", _gp_ca(stack), "-p", "-x", _proxy(stack, "hook-mitm"), f"https://{TLS}:{tls_origin}/hook-mitm"
        )
        assert code == 0 and json.loads(out)["path"] == "/hook-mitm", (out, err)
        fwd, mitm = _transactions(stack, "hook-fwd")[0], _transactions(stack, "hook-mitm")[0]
        wait_for(lambda: sum("/hook-" in e for e in events) >= 2, 10, message="both transaction.new events on /ws")
    finally:
        stop.set()
        watcher.join(5)
    # The origin received the hook's header on both paths.
    got = {r["path"]: r for r in RECEIVED}
    assert got["/hook-fwd"][HEADER.lower()] == SECRET and got["/hook-mitm"][HEADER.lower()] == SECRET
    # The record is the client's request: no such header, and the secret nowhere in it...
    for t in (fwd, mitm):
        detail = stack.get(f"/api/transactions/{t['id']}").json()
        assert not any(k.lower() == HEADER.lower() for k in detail["request_headers"]), detail
        assert SECRET not in json.dumps(detail)
    # ...nor in any /ws event (the two transactions' were seen), log file or database file.
    assert not [e for e in events if SECRET in e]
    for name, data in _everything_written(stack).items():
        assert SECRET.encode() not in data, name


# ---------------------------------------------------------------- the host contacted is the record's


def test_records_name_the_host_contacted_and_flag_a_spoofed_host(
    stack: Stack, plain_origin: int, tls_origin: int
) -> None:
    code, out, err = _curl(
        "--cacert",
        _gp_ca(stack),
        "-p",
        "-x",
        _proxy(stack, "spoof-tls"),
        "-H",
        f"Host: {SPOOF}",
        f"https://{TLS}:{tls_origin}/spoof",
    )
    assert code == 0 and json.loads(out)["host"] == SPOOF, err  # the origin saw the Host the client sent
    t = _transactions(stack, "spoof-tls")[0]
    assert t["destination_host"] == TLS and t["destination_port"] == tls_origin
    assert t["url"] == f"https://{TLS}:{tls_origin}/spoof"
    assert t["request_host"] == SPOOF and t["host_mismatch"] is True

    # Plain HTTP inside a CONNECT tunnel: the tunnel's host is the destination, whatever Host says.
    sock = _connect_tunnel(stack, "spoof-plain", PLAIN, plain_origin)
    with sock:
        sock.sendall(f"GET /spoof-plain HTTP/1.1\r\nHost: {SPOOF}\r\n\r\n".encode())
        assert _read_response(sock)[0] == 200
    t = _transactions(stack, "spoof-plain")[0]
    assert t["destination_host"] == PLAIN and t["url"] == f"http://{PLAIN}:{plain_origin}/spoof-plain"
    assert t["request_host"] == SPOOF and t["host_mismatch"] is True

    # An honest request: the same host, no flag.
    code, _out, err = _curl(
        "--cacert", _gp_ca(stack), "-p", "-x", _proxy(stack, "honest"), f"https://{TLS}:{tls_origin}/honest"
    )
    assert code == 0, err
    t = _transactions(stack, "honest")[0]
    assert t["request_host"] == TLS and t["host_mismatch"] is False and t["error"] is None

    # The per-request rule check judges the host contacted, not the Host header: a deny for the
    # spoofed name does not apply to a tunnel to another host, a deny for the contacted one does.
    r = stack.request(
        "POST",
        "/api/rules",
        json={"container_pattern": "spoof-rules", "destination_pattern": SPOOF, "port_pattern": "*", "action": "deny"},
    )
    assert r.status_code == 201, r.text
    ctx = ssl.create_default_context(cafile=_gp_ca(stack))
    with ctx.wrap_socket(_connect_tunnel(stack, "spoof-rules", TLS, tls_origin), server_hostname=TLS) as tls:
        tls.sendall(f"GET /judged HTTP/1.1\r\nHost: {SPOOF}\r\n\r\n".encode())
        assert _read_response(tls)[0] == 200
        r = stack.request(
            "POST",
            "/api/rules",
            json={
                "container_pattern": "spoof-rules",
                "destination_pattern": TLS,
                "port_pattern": "*",
                "action": "deny",
            },
        )
        assert r.status_code == 201, r.text
        tls.sendall(f"GET /judged-again HTTP/1.1\r\nHost: {SPOOF}\r\n\r\n".encode())
        status, headers, body = _read_response(tls)
        assert status == 403 and headers["x-greyproxy-reason"] == "rule" and body == b"Request denied by proxy"

    # And it was said in the proxy's log.
    def logged() -> bool:
        text = (stack.data_dir / "logs" / "proxy.log").read_text(errors="replace")
        return "host mismatch" in text and SPOOF in text

    wait_for(logged, 5, message="the host mismatch in proxy.log")
