"""Secrets hygiene (issue 8): private file modes in the data dir, and no secret that crossed the
proxy (a proxy password, redacted request/response headers) in any log file or in the database.

The stack runs at DEBUG log level, so a secret logged anywhere at all would be found.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import shutil
import socket
import stat
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from conftest import Stack, free_port, https_origin, stack_cli, wait_for
from greyproxy.config import load_config

pytestmark = [pytest.mark.stack, pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required")]

ORIGIN = "127.0.0.2"
TAG = uuid.uuid4().hex[:12]
PASSWORD = f"SECRETPASS{TAG}"  # proxy password (HTTP Basic and SOCKS5)
AUTHORIZATION = f"sk-authz-{TAG}"  # Authorization: Bearer ...
COOKIE = f"cookie-{TAG}"  # Cookie: sid=...
API_KEY = f"apikey-{TAG}"  # X-Api-Key (matches *api-key*)
SET_COOKIE = f"setcookie-{TAG}"  # the origin's Set-Cookie
SECRETS = [PASSWORD, AUTHORIZATION, COOKIE, API_KEY, SET_COOKIE]


class _Origin(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Set-Cookie", f"session={SET_COOKIE}; HttpOnly")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def tls_origin(origin_ca: trustme.CA) -> Iterator[int]:
    with https_origin(origin_ca, ORIGIN, _Origin) as port:
        yield port


@pytest.fixture(scope="module")
def plain_origin() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer((ORIGIN, free_port()), _Origin)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def stack(origin_ca_file: Path) -> Iterator[Stack]:
    s = Stack({"proxy": {"holdTimeout": 1}, "mitm": {"upstreamCaFile": str(origin_ca_file)}})
    s.env["GREYPROXY_LOG_LEVEL"] = "DEBUG"
    try:
        # Loose modes left by someone else: the stack must make them private again.
        s.data_dir.mkdir(parents=True)
        os.chmod(s.data_dir, 0o755)
        stack_cli(s, "cert", "generate")
        os.chmod(s.data_dir / "ca-key.pem", 0o644)
        s.db_path.touch()
        os.chmod(s.db_path, 0o644)
        s.start(timeout=40)
        r = s.request(
            "POST",
            "/api/rules",
            json={"container_pattern": "*", "destination_pattern": ORIGIN, "port_pattern": "*", "action": "allow"},
        )
        assert r.status_code == 201, r.text
        yield s
    finally:
        s.cleanup()
        shutil.rmtree(s.root, ignore_errors=True)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _curl(*args: str) -> tuple[int, bytes, str]:
    p = subprocess.run(["curl", "-s", "-S", "--max-time", "20", *args], capture_output=True, timeout=30)
    return p.returncode, p.stdout, p.stderr.decode(errors="replace")


def _secret_headers() -> list[str]:
    return [
        "-H",
        f"Authorization: Bearer {AUTHORIZATION}",
        "-H",
        f"Cookie: sid={COOKIE}",
        "-H",
        f"X-Api-Key: {API_KEY}",
    ]


def _raw(stack: Stack, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", stack.ports["http-proxy"]), timeout=20) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
        return out


def _needles() -> list[bytes]:
    out = []
    for secret in SECRETS:
        out.append(secret.encode())
    for user in ("agent-secret", "agent-plain", "agent-forward", "agent-held", "agent-bad"):
        out.append(base64.b64encode(f"{user}:{PASSWORD}".encode()))
    return out


def _files(stack: Stack) -> list[Path]:
    files = [p for p in (stack.data_dir / "logs").rglob("*") if p.is_file()]
    files.append(stack.serve_log)
    files += [Path(f"{stack.db_path}{suffix}") for suffix in ("", "-wal", "-shm")]
    return [p for p in files if p.exists()]


def _grep(stack: Stack) -> list[str]:
    found = []
    for path in _files(stack):
        data = path.read_bytes()
        for needle in _needles():
            if needle in data:
                found.append(f"{path.name}: {needle.decode()}")
    return found


def test_data_dir_files_are_private(stack: Stack) -> None:
    assert _mode(stack.data_dir) == 0o700
    assert _mode(stack.data_dir / "ca-key.pem") == 0o600  # fixed when the proxy loaded it
    assert _mode(stack.data_dir / "ca-cert.pem") == 0o644
    assert _mode(stack.db_path) == 0o600  # fixed when the first process opened it
    for suffix in ("-wal", "-shm"):
        side = Path(f"{stack.db_path}{suffix}")
        if side.exists():
            assert _mode(side) == 0o600, side
    key = stack.data_dir / "session.key"
    if key.exists():
        assert _mode(key) == 0o600
    log_dir = stack.data_dir / "logs"
    assert _mode(log_dir) == 0o700
    logs = list(log_dir.glob("*.log"))
    assert logs
    for path in logs:
        assert _mode(path) & 0o077 == 0, (path, oct(_mode(path)))
    run_dir = load_config(stack.cfg_path, env=stack.env).run_dir
    assert _mode(run_dir) == 0o700
    for sock in run_dir.glob("*.sock"):
        assert _mode(sock) & 0o077 == 0, (sock, oct(_mode(sock)))


def test_no_secret_reaches_logs_or_database(stack: Stack, tls_origin: int, plain_origin: int) -> None:
    ca = str(stack.data_dir / "ca-cert.pem")
    proxy_port = stack.ports["http-proxy"]
    # HTTPS, intercepted, through the HTTP proxy with a proxy password.
    code, out, err = _curl(
        "--cacert",
        ca,
        "-x",
        f"http://agent-secret:{PASSWORD}@127.0.0.1:{proxy_port}",
        *_secret_headers(),
        f"https://{ORIGIN}:{tls_origin}/tls",
    )
    assert code == 0 and b"/tls" in out, err
    # Plain HTTP inside a CONNECT tunnel.
    code, out, err = _curl(
        "-p",
        "-x",
        f"http://agent-plain:{PASSWORD}@127.0.0.1:{proxy_port}",
        *_secret_headers(),
        f"http://{ORIGIN}:{plain_origin}/tunnelled",
    )
    assert code == 0 and b"/tunnelled" in out, err
    # Plain HTTP forwarded by the proxy.
    code, out, err = _curl(
        "-x",
        f"http://agent-forward:{PASSWORD}@127.0.0.1:{proxy_port}",
        *_secret_headers(),
        f"http://{ORIGIN}:{plain_origin}/forwarded",
    )
    assert code == 0 and b"/forwarded" in out, err
    # SOCKS5 with a username/password, intercepted.
    code, out, err = _curl(
        "--cacert",
        ca,
        "-x",
        f"socks5h://agent-socks:{PASSWORD}@127.0.0.1:{stack.socks_port}",
        *_secret_headers(),
        f"https://{ORIGIN}:{tls_origin}/socks",
    )
    assert code == 0 and b"/socks" in out, err
    # Held then blocked (pending entry, blocked log), and a malformed request: both carry the password.
    auth = base64.b64encode(f"agent-held:{PASSWORD}".encode()).decode()
    reply = _raw(
        stack,
        f"GET http://held.example.test/ HTTP/1.1\r\nHost: held.example.test\r\n"
        f"Proxy-Authorization: Basic {auth}\r\nAuthorization: Bearer {AUTHORIZATION}\r\n"
        f"Connection: close\r\n\r\n".encode(),
    )
    assert reply.startswith(b"HTTP/1.1 403"), reply[:100]
    auth = base64.b64encode(f"agent-bad:{PASSWORD}".encode()).decode()
    reply = _raw(
        stack,
        f"GET http://{ORIGIN}:{plain_origin}/ HTTP/1.1\r\nProxy-Authorization: Basic {auth}\r\n"
        f"Cookie: {COOKIE}\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n".encode(),
    )
    assert reply.startswith(b"HTTP/1.1 400"), reply[:100]

    # Everything was recorded (so the records did reach the database) ...
    def recorded() -> bool:
        items = stack.get("/api/transactions", params={"limit": 100}).json()["items"]
        urls = {t["url"] for t in items}
        logs = stack.get("/api/logs", params={"limit": 100}).json()["items"]
        names = {e["container_name"] for e in logs}
        pending = stack.get("/api/pending").json()["items"]
        return (
            any(u.endswith("/tls") for u in urls)
            and any(u.endswith("/socks") for u in urls)
            and any(u.endswith("/tunnelled") for u in urls)
            and {"agent-secret", "agent-plain", "agent-forward", "agent-socks", "agent-held"} <= names
            and any(p["container_name"] == "agent-held" for p in pending)
        )

    wait_for(recorded, 15, interval=0.2, message="transactions, logs and the pending entry recorded")
    detail = stack.get("/api/transactions", params={"container": "agent-secret", "include_bodies": "true"}).json()
    headers = {k.lower(): v for k, v in detail["items"][0]["request_headers"].items()}
    assert headers["authorization"] == ["[REDACTED]"] and headers["cookie"] == ["[REDACTED]"]

    # ... and no secret is in any log file or in the database, WAL included.
    found = _grep(stack)
    assert not found, found
    # Controls: the files searched do hold the records, and the logs are at DEBUG level.
    stored = b"".join(p.read_bytes() for p in _files(stack) if p.name.startswith("greyproxy.db"))
    assert b"agent-secret" in stored and b"/tunnelled" in stored
    logs = b"".join(p.read_bytes() for p in (stack.data_dir / "logs").glob("*.log"))
    assert b" DEBUG " in logs
    # After a clean stop the WAL is checkpointed into the main file: still nothing.
    stack.stop()
    found = _grep(stack)
    assert not found, found
    assert len(_files(stack)) >= 7
