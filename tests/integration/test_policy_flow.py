"""Policy core through the real stack: holds, decisions, deny, timeouts, the guard, bad input.

Clients are real: curl (HTTP proxy, CONNECT with -p, --socks5-hostname) and raw sockets where
the exact bytes matter. The origin listens on 127.0.0.2, which no builtin rule covers.
"""

from __future__ import annotations

import base64
import http.server
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from conftest import Stack, free_port, wait_for

pytestmark = [pytest.mark.stack, pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required")]

ORIGIN_HOST = "127.0.0.2"
RELEASED_WITHIN = 5.0  # seconds from a decision to the held client's answer; the hold timeout is 20 s


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = f"hello from origin {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Seen-Proxy-Auth", "yes" if self.headers.get("Proxy-Authorization") else "no")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        n = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(n) if n else b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                data += self.rfile.read(size)
                self.rfile.readline()
        body = b"got " + str(len(data)).encode() + b" bytes: " + data[:32]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


@pytest.fixture(scope="module")
def origin() -> Iterator[int]:
    port = free_port()
    server = http.server.ThreadingHTTPServer((ORIGIN_HOST, port), _Handler)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield port
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = Stack({"proxy": {"holdTimeout": 20, "headerTimeout": 2}})
    s.start()
    try:
        yield s
    finally:
        s.cleanup()


def _curl(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["curl", "-s", "-S", "--max-time", "25", "-o", "-", "-w", "\n%{http_code}", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _pending_for(stack: Stack, container: str, port: int) -> dict | None:
    items = stack.get("/api/pending", params={"container": container}).json()["items"]
    for item in items:
        if item["container_name"] == container and item["destination_port"] == port:
            return item
    return None


def _allow_and_time(
    stack: Stack, proc: subprocess.Popen, container: str, port: int, body: dict | None = None
) -> tuple[str, float, dict]:
    entry = wait_for(lambda: _pending_for(stack, container, port), 10, message=f"pending entry for {container}")
    assert proc.poll() is None, "the client must still be waiting while the entry is pending"
    r = stack.request("POST", f"/api/pending/{entry['id']}/allow", json=body or {})
    t_allowed = time.monotonic()
    assert r.status_code == 200, r.text
    out, err = proc.communicate(timeout=10)
    return out, time.monotonic() - t_allowed, r.json()


def _log_rows(stack: Stack, container: str) -> list[dict]:
    items = stack.get("/api/logs", params={"container": container, "limit": 100}).json()["items"]
    return [i for i in items if i["container_name"] == container]  # ?container= is a substring


def test_http_hold_then_allow(stack: Stack, origin: int) -> None:
    proc = _curl("-x", f"http://agent1@127.0.0.1:{stack.ports['http-proxy']}", f"http://{ORIGIN_HOST}:{origin}/x")
    entry = wait_for(lambda: _pending_for(stack, "agent1", origin), 10, message="pending entry")
    assert entry["destination_host"] == ORIGIN_HOST
    assert entry["waiting"] >= 1
    out, elapsed, answer = _allow_and_time(stack, proc, "agent1", origin)
    assert out.endswith("\n200"), out
    assert "hello from origin /x" in out
    assert "yes" not in out  # Proxy-Authorization never reaches the origin
    # Released by the allow, not by the 20 s hold timeout (loose: a busy CI machine is slow too).
    assert elapsed < RELEASED_WITHIN, f"client completed {elapsed:.3f}s after the allow"
    rule = answer["rule"]
    assert answer["pending_removed"] is True
    assert (rule["container_pattern"], rule["destination_pattern"], rule["port_pattern"]) == (
        "agent1",
        ORIGIN_HOST,
        str(origin),
    )
    rules = stack.get("/api/rules", params={"container": "agent1"}).json()["items"]
    assert any(r["id"] == rule["id"] for r in rules)
    assert _pending_for(stack, "agent1", origin) is None
    # The decision is logged (through the journal, a moment later).
    logs = wait_for(
        lambda: [r for r in _log_rows(stack, "agent1") if r["result"] == "allowed"], 5, message="allowed log entry"
    )
    assert logs[0]["method"] == "HTTP" and logs[0]["rule_id"] == rule["id"]
    assert logs[0]["rule_summary"] == f"agent1 → {ORIGIN_HOST}:{origin}"
    # A second request is allowed at once by the new rule.
    out2 = _curl("-x", f"http://agent1@127.0.0.1:{stack.ports['http-proxy']}", f"http://{ORIGIN_HOST}:{origin}/again")
    assert out2.communicate(timeout=10)[0].endswith("\n200")
    # Hit counts are batched into the rule (SPEC §2.1) within a few seconds.
    wait_for(
        lambda: stack.get("/api/rules", params={"container": "agent1"}).json()["items"][0]["hit_count"] >= 1,
        8,
        message="hit_count",
    )


def test_socks5_hold_then_allow(stack: Stack, origin: int) -> None:
    proc = _curl("--socks5-hostname", f"agent2:secret@127.0.0.1:{stack.socks_port}", f"http://{ORIGIN_HOST}:{origin}/s")
    out, elapsed, _ = _allow_and_time(stack, proc, "agent2", origin)
    assert out.endswith("\n200") and "hello from origin /s" in out, out
    assert elapsed < RELEASED_WITHIN
    logs = wait_for(lambda: _log_rows(stack, "agent2"), 5, message="socks log")
    assert logs[0]["method"] == "SOCKS5" and logs[0]["result"] == "allowed"


def test_connect_hold_then_allow(stack: Stack, origin: int) -> None:
    proc = _curl("-p", "-x", f"http://agent3@127.0.0.1:{stack.ports['http-proxy']}", f"http://{ORIGIN_HOST}:{origin}/c")
    out, elapsed, _ = _allow_and_time(stack, proc, "agent3", origin)
    assert out.endswith("\n200") and "hello from origin /c" in out, out
    assert elapsed < RELEASED_WITHIN
    logs = wait_for(lambda: _log_rows(stack, "agent3"), 5, message="connect log")
    assert logs[0]["method"] == "CONNECT"


def test_deny_http_and_socks(stack: Stack, origin: int) -> None:
    proc = _curl("-x", f"http://agent4@127.0.0.1:{stack.ports['http-proxy']}", f"http://{ORIGIN_HOST}:{origin}/d")
    entry = wait_for(lambda: _pending_for(stack, "agent4", origin), 10, message="pending entry")
    r = stack.request("POST", f"/api/pending/{entry['id']}/deny", json={})
    assert r.status_code == 200 and r.json()["rule"]["action"] == "deny"
    out, _ = proc.communicate(timeout=10)
    assert out.endswith("\n403"), out
    assert "Request denied by proxy" in out and "own listeners" not in out, out  # SPEC §7's text

    # Each request of a kept-alive connection is judged again: one the rules now deny gets the same
    # answer (once it said "Blocked by Greyproxy: ..." with no reason header, unlike a deny in a tunnel).
    r = stack.request(
        "POST",
        "/api/rules",
        json={
            "container_pattern": "agent4b",
            "destination_pattern": ORIGIN_HOST,
            "port_pattern": "*",
            "action": "allow",
        },
    )
    assert r.status_code == 201, r.text
    auth = base64.b64encode(b"agent4b:x").decode()
    request = f"GET http://{ORIGIN_HOST}:{origin}/d2 HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", stack.ports["http-proxy"]), timeout=10) as c:
        c.sendall(request.encode())
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = c.recv(65536)
            assert chunk, got
            got += chunk
        assert got.startswith(b"HTTP/1.1 200"), got
        deny = {"container_pattern": "agent4b", "destination_pattern": ORIGIN_HOST, "port_pattern": str(origin)}
        assert stack.request("POST", "/api/rules", json={**deny, "action": "deny"}).status_code == 201  # more specific
        time.sleep(0.5)  # (the change reaches the proxy)
        c.sendall(request.encode())
        while not got.endswith(b"Request denied by proxy\n"):
            chunk = c.recv(65536)
            assert chunk, got
            got += chunk
    second = got[got.rindex(b"HTTP/1.1 ") :].decode()
    assert second.startswith("HTTP/1.1 403"), second
    assert "X-Greyproxy-Reason: rule\r\n" in second and "text/plain" in second, second

    # SOCKS5 with raw bytes: the reply code must be 0x02 (not allowed by ruleset) for the denied host.
    s = socket.create_connection(("127.0.0.1", stack.socks_port), timeout=5)
    s.sendall(b"\x05\x01\x02")
    assert s.recv(2) == b"\x05\x02"
    s.sendall(b"\x01\x06agent4\x01x")
    assert s.recv(2) == b"\x01\x00"
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(ORIGIN_HOST) + struct.pack("!H", origin))
    reply = s.recv(10)
    assert reply[:2] == b"\x05\x02", reply
    s.close()
    logs = wait_for(lambda: [r for r in _log_rows(stack, "agent4") if r["method"] == "SOCKS5"], 5, message="log")
    assert logs[0]["result"] == "blocked" and logs[0]["reason"] == "rule"


def test_dismiss_blocks_held_connection(stack: Stack, origin: int) -> None:
    proc = _curl("-x", f"http://agent5@127.0.0.1:{stack.ports['http-proxy']}", f"http://{ORIGIN_HOST}:{origin}/z")
    entry = wait_for(lambda: _pending_for(stack, "agent5", origin), 10, message="pending entry")
    t0 = time.monotonic()
    r = stack.request("DELETE", f"/api/pending/{entry['id']}")
    assert r.json() == {"status": "ok", "removed": True}
    out, _ = proc.communicate(timeout=10)
    assert out.endswith("\n403") and time.monotonic() - t0 < 2.0
    logs = wait_for(lambda: _log_rows(stack, "agent5"), 5, message="log")
    assert logs[0]["reason"] == "dismissed"


def test_client_leaving_ends_its_hold(stack: Stack, origin: int) -> None:
    """A held client that drops its connection is let go at once (Gate.admit's client_gone, made only for a
    hold): logged blocked with reason client_gone long before the 20 s hold timeout."""
    auth = base64.b64encode(b"agentgone:").decode()
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", stack.ports["http-proxy"]), timeout=10) as sock:
        sock.sendall(
            f"GET http://{ORIGIN_HOST}:{origin}/g HTTP/1.1\r\nHost: {ORIGIN_HOST}:{origin}\r\n"
            f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode()
        )
        wait_for(lambda: _pending_for(stack, "agentgone", origin), 10, message="pending entry")
        # Reset, not a FIN: a half-closed client may still be reading its answer.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    logs = wait_for(lambda: _log_rows(stack, "agentgone"), 10, message="log")
    assert time.monotonic() - t0 < 15  # not the hold timeout (20 s)
    assert logs[0]["result"] == "blocked" and logs[0]["reason"] == "client_gone"


def test_hold_timeout(make_stack, origin: int) -> None:
    s = make_stack(proxy={"holdTimeout": 2})
    t0 = time.monotonic()
    proc = _curl("-x", f"http://agent6@127.0.0.1:{s.ports['http-proxy']}", f"http://{ORIGIN_HOST}:{origin}/t")
    out, _ = proc.communicate(timeout=15)
    elapsed = time.monotonic() - t0
    assert out.endswith("\n403"), out
    assert 1.8 <= elapsed < 6, elapsed
    logs = wait_for(lambda: _log_rows(s, "agent6"), 5, message="log")
    assert logs[0]["result"] == "blocked" and logs[0]["reason"] == "hold_timeout"
    assert logs[0]["response_time_ms"] >= 1900


def test_deleting_rule_closes_tunnel(stack: Stack, origin: int) -> None:
    r = stack.request(
        "POST",
        "/api/rules",
        json={
            "container_pattern": "agent7",
            "destination_pattern": ORIGIN_HOST,
            "port_pattern": str(origin),
            "action": "allow",
        },
    )
    assert r.status_code == 201, r.text
    rule_id = r.json()["id"]
    s = socket.create_connection(("127.0.0.1", stack.ports["http-proxy"]), timeout=5)
    auth = base64.b64encode(b"agent7:x").decode()
    s.sendall(
        f"CONNECT {ORIGIN_HOST}:{origin} HTTP/1.1\r\nHost: {ORIGIN_HOST}:{origin}\r\n"
        f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode()
    )
    assert s.recv(1024).startswith(b"HTTP/1.1 200")
    # The tunnel works...
    s.sendall(f"GET /t HTTP/1.1\r\nHost: {ORIGIN_HOST}\r\n\r\n".encode())
    assert b"hello from origin /t" in _recv_until(s, b"/t\n")
    # ...until the rule that allowed it is deleted.
    t0 = time.monotonic()
    assert stack.request("DELETE", f"/api/rules/{rule_id}").json()["deleted"] is True
    s.settimeout(3)
    try:
        data = s.recv(1024)
    except ConnectionResetError:
        data = b""
    assert data == b"", data
    assert time.monotonic() - t0 < 3.0  # closed by the delete, long before any idle timeout
    s.close()


def _recv_until(s: socket.socket, marker: bytes, limit: float = 5.0) -> bytes:
    buf = b""
    deadline = time.monotonic() + limit
    while marker not in buf and time.monotonic() < deadline:
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def test_guard_blocks_own_api_port(stack: Stack) -> None:
    proc = _curl(
        "-x",
        f"http://agent8@127.0.0.1:{stack.ports['http-proxy']}",
        f"http://127.0.0.1:{stack.ports['api']}/api/health",
    )
    out, _ = proc.communicate(timeout=10)
    assert out.endswith("\n403"), out
    # SPEC §2 hard guard: the refusal says why (a shell set up by `greyproxy env` sends curl's API
    # calls here).
    assert "one of Greyproxy's own listeners" in out, out
    # A CONNECT to its own port: the same 403 and text.
    with socket.create_connection(("127.0.0.1", stack.ports["http-proxy"]), timeout=5) as s:
        target = f"127.0.0.1:{stack.ports['api']}"
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        answer = _recv_until(s, b"--noproxy")
    assert answer.startswith(b"HTTP/1.1 403 "), answer
    assert b"one of Greyproxy's own listeners" in answer, answer
    proc = _curl(
        "--socks5-hostname", f"agent8:x@127.0.0.1:{stack.socks_port}", f"http://localhost:{stack.ports['http-proxy']}/"
    )
    proc.communicate(timeout=10)
    assert proc.returncode != 0
    logs = wait_for(lambda: [r for r in _log_rows(stack, "agent8") if r["reason"] == "guard"], 5, message="guard log")
    assert all(r["result"] == "blocked" for r in logs)
    assert _pending_for(stack, "agent8", stack.ports["api"]) is None


def _loopback_name() -> str | None:
    """A name other than localhost that this machine resolves to a loopback address (its own host
    name on most Debian machines and containers, or /etc/hosts' ip6-localhost), else None."""
    import ipaddress

    for name in (socket.gethostname(), "ip6-localhost", "ip6-loopback"):
        if not name or name.lower() == "localhost" or name.lower().endswith(".localhost"):
            continue
        try:
            infos = socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            continue
        if infos and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos):
            return name
    return None


def test_a_name_resolving_to_our_own_listener_is_blocked_and_logged_as_the_guard(stack: Stack) -> None:
    """SPEC §2.3 hard guard, reached through a name: whatever rule allows the name, the client gets
    the guard's 403 (HTTP, CONNECT) or SOCKS5 0x02, the log entry says blocked by the guard (it said
    allowed by the rule: the refusal came only at connect), and explain agrees with the proxy."""
    name = _loopback_name()
    if name is None:
        pytest.skip("no name other than localhost resolves to a loopback address on this machine")
    rule = stack.request(
        "POST", "/api/rules", json={"container_pattern": "guardname", "destination_pattern": name, "action": "allow"}
    ).json()
    api = stack.ports["api"]
    out, _ = _curl(
        "-x", f"http://guardname@127.0.0.1:{stack.ports['http-proxy']}", f"http://{name}:{api}/api/health"
    ).communicate(timeout=20)
    assert out.endswith("\n403") and "one of Greyproxy's own listeners" in out, out
    with socket.create_connection(("127.0.0.1", stack.ports["http-proxy"]), timeout=5) as s:
        auth = base64.b64encode(b"guardname:x").decode()
        target = f"{name}:{stack.ports['http-proxy']}"
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode())
        answer = _recv_until(s, b"--noproxy")
    assert answer.startswith(b"HTTP/1.1 403 "), answer
    proc = _curl("--socks5-hostname", f"guardname:x@127.0.0.1:{stack.socks_port}", f"http://{name}:{stack.socks_port}/")
    proc.communicate(timeout=20)
    assert proc.returncode == 97, proc.returncode  # curl: the SOCKS5 server refused the connection (0x02)

    def three() -> list[dict] | None:
        rows = _log_rows(stack, "guardname")
        return rows if len(rows) >= 3 else None

    rows = wait_for(three, 10, message="three log entries")
    assert [(r["result"], r["reason"], r["rule_id"]) for r in rows] == [("blocked", "guard", None)] * 3, rows
    assert {r["method"] for r in rows} == {"HTTP", "CONNECT", "SOCKS5"}, rows
    explained = stack.get("/api/rules/explain", params={"container": "guardname", "host": name, "port": api}).json()
    assert explained["decision"] == "guard", explained
    listed = stack.get("/api/rules", params={"container": "guardname"}).json()["items"]
    assert [(r["id"], r["hit_count"]) for r in listed] == [(rule["id"], 0)], listed  # the rule decided nothing


def test_keepalive_rechecks_each_request(stack: Stack, origin: int) -> None:
    stack.request(
        "POST",
        "/api/rules",
        json={
            "container_pattern": "agent9",
            "destination_pattern": ORIGIN_HOST,
            "port_pattern": str(origin),
            "action": "allow",
        },
    )
    s = socket.create_connection(("127.0.0.1", stack.ports["http-proxy"]), timeout=5)
    auth = base64.b64encode(b"agent9:").decode()
    req = (
        f"GET http://{ORIGIN_HOST}:{origin}/k1 HTTP/1.1\r\nHost: {ORIGIN_HOST}:{origin}\r\n"
        f"Proxy-Authorization: Basic {auth}\r\n\r\n"
    ).encode()
    s.sendall(req)
    assert b"/k1" in _recv_until(s, b"/k1\n")
    s.sendall(req.replace(b"/k1", b"/k2"))
    assert b"/k2" in _recv_until(s, b"/k2\n")
    # Same connection, a destination this identity has a deny rule for: 403 on that request.
    stack.request(
        "POST", "/api/rules", json={"container_pattern": "agent9", "destination_pattern": "127.0.0.3", "action": "deny"}
    )
    s.sendall(f"GET http://127.0.0.3:{origin}/k3 HTTP/1.1\r\nHost: 127.0.0.3\r\n\r\n".encode())
    assert _recv_until(s, b"\r\n").startswith(b"HTTP/1.1 403")
    s.close()
    logs = wait_for(lambda: len(_log_rows(stack, "agent9")) >= 3 and _log_rows(stack, "agent9"), 5, message="3 logs")
    assert sorted(r["result"] for r in logs[:3]) == ["allowed", "allowed", "blocked"]


def test_post_bodies_chunked_and_expect(stack: Stack, origin: int) -> None:
    stack.request(
        "POST",
        "/api/rules",
        json={"container_pattern": "agent10", "destination_pattern": ORIGIN_HOST, "action": "allow"},
    )
    base = ["-x", f"http://agent10@127.0.0.1:{stack.ports['http-proxy']}"]
    out, _ = _curl(*base, "--data-binary", "hello-body", f"http://{ORIGIN_HOST}:{origin}/p").communicate(timeout=10)
    assert "got 10 bytes: hello-body" in out and out.endswith("\n200")
    out, _ = _curl(
        *base, "-H", "Transfer-Encoding: chunked", "--data-binary", "chunky", f"http://{ORIGIN_HOST}:{origin}/p"
    ).communicate(timeout=10)
    assert "got 6 bytes: chunky" in out, out
    big = "x" * 2000
    out, _ = _curl(
        *base, "-H", "Expect: 100-continue", "--data-binary", big, f"http://{ORIGIN_HOST}:{origin}/p"
    ).communicate(timeout=10)
    assert "got 2000 bytes" in out, out
    out, _ = _curl(*base, "-0", f"http://{ORIGIN_HOST}:{origin}/ten").communicate(timeout=10)
    assert "hello from origin /ten" in out and out.endswith("\n200")


def _raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        buf = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            buf += chunk
        return buf
    finally:
        s.close()


def test_bad_input_gets_errors_and_proxy_keeps_serving(stack: Stack, origin: int) -> None:
    hp = stack.ports["http-proxy"]
    assert _raw_exchange(hp, b"\x00\x01garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    huge = b"GET http://a/" + b"a" * (1 << 20) + b" HTTP/1.1\r\n\r\n"
    s = socket.create_connection(("127.0.0.1", hp), timeout=5)
    try:
        s.sendall(huge)
    except (BrokenPipeError, ConnectionResetError):
        pass
    head = s.recv(64)
    s.close()
    assert head.startswith((b"HTTP/1.1 414", b"HTTP/1.1 431")), head
    many = b"GET http://a/ HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n"
    assert _raw_exchange(hp, many).startswith(b"HTTP/1.1 431")
    smuggle = b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert _raw_exchange(hp, smuggle).startswith(b"HTTP/1.1 400")
    # SOCKS greeting with zero methods: "no acceptable methods", then closed.
    assert _raw_exchange(stack.socks_port, b"\x05\x00") == b"\x05\xff"
    assert _raw_exchange(stack.socks_port, b"\x04\x01\x00\x50") == b""
    # A slow client (one byte a second) is cut at the 2 s header deadline.
    s = socket.create_connection(("127.0.0.1", hp), timeout=10)
    t0 = time.monotonic()
    got = b""
    for ch in b"GET http://a/ HTTP/1.1\r\n":
        try:
            s.sendall(bytes([ch]))
        except (BrokenPipeError, ConnectionResetError):
            break
        s.settimeout(1.0)
        try:
            got = s.recv(1024)
        except socket.timeout:
            continue
        except ConnectionResetError:
            break
        break
    s.close()
    assert got.startswith(b"HTTP/1.1 408") or got == b"", got
    assert time.monotonic() - t0 < 5
    # And a normal client is still served.
    stack.request(
        "POST",
        "/api/rules",
        json={"container_pattern": "agent11", "destination_pattern": ORIGIN_HOST, "action": "allow"},
    )
    out, _ = _curl("-x", f"http://agent11@127.0.0.1:{hp}", f"http://{ORIGIN_HOST}:{origin}/ok").communicate(timeout=10)
    assert out.endswith("\n200")


def test_upstream_refused_gives_502(stack: Stack) -> None:
    dead = free_port()
    stack.request(
        "POST",
        "/api/rules",
        json={"container_pattern": "agent12", "destination_pattern": ORIGIN_HOST, "action": "allow"},
    )
    out, _ = _curl(
        "-x", f"http://agent12@127.0.0.1:{stack.ports['http-proxy']}", f"http://{ORIGIN_HOST}:{dead}/"
    ).communicate(timeout=10)
    assert out.endswith("\n502") and "refused" in out, out
    s = socket.create_connection(("127.0.0.1", stack.socks_port), timeout=5)
    s.sendall(b"\x05\x01\x02")
    s.recv(2)
    s.sendall(b"\x01\x07agent12\x01x")
    s.recv(2)
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(ORIGIN_HOST) + struct.pack("!H", dead))
    assert s.recv(10)[:2] == b"\x05\x05"
    s.close()


def test_silent_allow_mode(stack: Stack, origin: int) -> None:
    r = stack.request("POST", "/api/allowall", json={"mode": "allow", "duration_seconds": 60})
    assert r.status_code == 200 and r.json()["active"] is True and r.json()["mode"] == "allow"
    try:
        out, _ = _curl(
            "-x", f"http://agent13@127.0.0.1:{stack.ports['http-proxy']}", f"http://{ORIGIN_HOST}:{origin}/silent"
        ).communicate(timeout=10)
        assert out.endswith("\n200")
        logs = wait_for(lambda: _log_rows(stack, "agent13"), 5, message="log")
        assert logs[0]["reason"] == "silent_allow" and logs[0]["rule_id"] is None
    finally:
        r = stack.request("DELETE", "/api/allowall")
    assert r.json()["active"] is False
