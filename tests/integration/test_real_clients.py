"""The HTTP forward proxy's request path under real clients and misbehaving origins: what the
client gets, how its connection ends, and what the transaction records say.

A defect hunt against the request path (keepalive.py serving kept-alive requests in callbacks,
exchange.py, http1.py's split reading); most scenarios tried were fine and are covered elsewhere
(tests/integration/test_request_path.py, test_upstream_pool.py, test_limits.py,
test_policy_flow.py). The tests here are the ones that found something.

The origin is a small threaded HTTP/1.1 server whose paths misbehave on purpose, and which
counts every request line it receives (`Origin.seen`), so a test can tell whether a request left
the proxy once, twice or never.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from conftest import Stack, add_rule, wait_for

pytestmark = [pytest.mark.stack, pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required")]

HOST = "127.0.0.1"
SLOW = 1.5  # seconds /slow... waits before answering


class Origin(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__((HOST, 0), _Handler)
        self.lock = threading.Lock()
        self.seen: list[str] = []  # request targets, in the order they arrived

    @property
    def port(self) -> int:
        return self.server_address[1]

    def count(self, path: str) -> int:
        with self.lock:
            return sum(1 for p in self.seen if p == path)


class _Handler(socketserver.BaseRequestHandler):
    server: Origin

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(30)
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                with self.server.lock:
                    self.server.seen.append(path)
                if path.startswith("/slow"):
                    time.sleep(SLOW)
                length = _content_length(head)
                if path.startswith("/drip"):  # 2 MB, 10 KB every 20 ms
                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n")
                    for _ in range(200):
                        sock.sendall(b"d" * 10000)
                        time.sleep(0.02)
                    continue
                if path.startswith("/stuck"):  # reads nothing more, answers nothing
                    time.sleep(30)
                    return
                if path.startswith("/half-then-close"):  # reads half the request body, then hangs up
                    while len(buf) < length // 2:
                        data = sock.recv(65536)
                        if not data:
                            return
                        buf += data
                    sock.close()
                    return
                while len(buf) < length:  # the request body, read in full
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                received, buf = buf[:length], buf[length:]
                body = f"answer to {path}\n".encode()
                if path.startswith("/sha256"):
                    body = hashlib.sha256(received).hexdigest().encode()
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        except OSError:
            return


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack() as s:
        yield s


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    server = Origin()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _curl(stack: Stack, user: str, *urls: str) -> subprocess.Popen:
    """curl through the proxy as `user`, every URL on one client connection; prints each status."""
    cmd = ["curl", "-s", "--max-time", "10", "-x", f"http://{user}:x@127.0.0.1:{stack.ports['http-proxy']}"]
    for url in urls:
        cmd += ["-o", "/dev/null", "-w", "%{http_code}\n", url]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _transactions(stack: Stack, container: str) -> list[dict]:
    return stack.get("/api/transactions", params={"container": container, "limit": 100}).json()["items"]


@pytest.mark.parametrize("kept", ["same client connection", "parked upstream"])
def test_a_request_whose_rule_is_revoked_while_it_waits_is_never_sent_again(
    stack: Stack, origin: Origin, kept: str
) -> None:
    """The rule that let a request through is turned to deny while the origin takes its time: the
    proxy closes both connections (SPEC §2.4). That close must not read as a kept upstream connection
    the origin dropped (which a GET is sent again for, on a new connection): the request would leave
    a second time after the deny, and be recorded `200 allowed` for a client that got nothing."""
    user = "revoked-" + kept.split()[0]
    base = f"http://localhost:{origin.port}"  # a name: the address guard does not stop the resend
    rule = add_rule(
        stack, container_pattern=user, destination_pattern="localhost", port_pattern=str(origin.port), action="allow"
    )
    slow = f"/slow-{user}"
    if kept == "same client connection":
        curl = _curl(stack, user, base + "/warm", base + slow)
    else:  # the first request's upstream connection is parked, the second client connection takes it
        first = _curl(stack, user, base + "/warm")
        assert first.communicate(timeout=15)[0].split() == ["200"]
        curl = _curl(stack, user, base + slow)
    wait_for(lambda: origin.count(slow) == 1, 10, message="the origin got the request")
    r = stack.request("PUT", f"/api/rules/{rule['id']}", json={"action": "deny"})
    assert r.status_code == 200, r.text
    out, _ = curl.communicate(timeout=15)
    # No answer on that connection (curl, whose kept connection died, tries once more on a new one:
    # refused by the rule now).
    assert out.split()[-1] in ("000", "403"), out
    time.sleep(SLOW + 0.5)  # a resent request would have been answered by now
    assert origin.count(slow) == 1, origin.seen

    def slow_records() -> list[dict] | None:
        rows = [t for t in _transactions(stack, user) if t["url"].endswith(slow)]
        return rows if any(t["result"] == "allowed" for t in rows) else None

    rows = wait_for(slow_records, 10, message="the record of the revoked request")
    assert not [t for t in rows if t["status_code"] == 200 or t["response_body_size"]], rows
    revoked = [t for t in rows if t["result"] == "allowed"]
    assert len(revoked) == 1 and revoked[0]["error"], rows
    assert "upstream" not in revoked[0]["error"], revoked  # not the origin's fault


def test_a_download_whose_rule_is_revoked_is_not_recorded_as_the_clients_doing(stack: Stack, origin: Origin) -> None:
    """Revoking the rule in the middle of a response body closes both connections; the record said
    'the client went away during the response'. It now says Greyproxy may have closed both."""
    user = "revoked-drip"
    rule = add_rule(stack, container_pattern=user, destination_pattern=HOST, port_pattern=str(origin.port))
    curl = _curl(stack, user, f"http://{HOST}:{origin.port}/warm", f"http://{HOST}:{origin.port}/drip-{user}")
    wait_for(lambda: origin.count(f"/drip-{user}") == 1, 10, message="the download started")
    time.sleep(0.3)
    assert stack.request("PUT", f"/api/rules/{rule['id']}", json={"action": "deny"}).status_code == 200
    out, _ = curl.communicate(timeout=15)
    assert out.split()[-1] in ("200", "403"), out  # the head came; curl may try once more (refused)

    def record() -> dict | None:
        rows = [t for t in _transactions(stack, user) if t["url"].endswith("/drip-" + user) and t["error"]]
        return rows[0] if rows else None

    t = wait_for(record, 10, message="the record of the cut download")
    assert t["status_code"] == 200 and 0 < t["response_body_size"] < 2000000, t
    assert "Greyproxy closed both" in t["error"] and "the client went away" not in t["error"], t


@pytest.fixture(scope="module")
def upload(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("upload") / "body.bin"
    path.write_bytes(os.urandom(8 << 20))
    return str(path)


def test_an_upload_cut_short_says_whose_doing_it_was(stack: Stack, origin: Origin, upload: str) -> None:
    """curl uploads 8 MiB. When curl gives up half way (--max-time), the record says the client
    closed its connection in the middle of the body (it said 'the request body did not arrive: '
    with no reason); when the origin hangs up half way, curl gets a 502 and the record blames the
    upstream (it could also end with no answer at all, depending on which side noticed first)."""
    proxy = f"http://cut-upload:x@127.0.0.1:{stack.ports['http-proxy']}"
    base = f"http://{HOST}:{origin.port}"
    add_rule(stack, container_pattern="cut-upload", destination_pattern=HOST, port_pattern="*", action="allow")
    slow = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "1", "--limit-rate", "1M", "-H",
         "Expect:", "-x", proxy, "--data-binary", "@" + upload, base + "/sink"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert slow.stdout == "000" and slow.returncode == 28  # curl's own timeout
    cut = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", "-H", "Expect:", "-x", proxy,
         "--data-binary", "@" + upload, base + "/half-then-close"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert cut.stdout == "502", (cut.stdout, cut.stderr)

    def records() -> dict[str, dict] | None:
        rows = {t["url"].rsplit("/", 1)[1]: t for t in _transactions(stack, "cut-upload")}
        return rows if {"sink", "half-then-close"} <= rows.keys() else None

    rows = wait_for(records, 10, message="both records")
    sink, half = rows["sink"], rows["half-then-close"]
    assert sink["error"] == "the request body did not arrive: the client closed its connection in the middle of it"
    assert sink["status_code"] is None and 0 < sink["request_body_size"] < 8 << 20, sink
    assert half["status_code"] == 502 and half["error"] == "upstream closed the connection without answering", half


def test_an_upload_longer_than_the_idle_timeout_is_not_cut_with_a_504(make_stack, origin: Origin, upload: str) -> None:
    """The origin's answer was awaited from the moment the request head went out: an upload still
    flowing after `proxy.idleTimeout` (600 s by default: a 10-minute upload) got `504 the upstream did
    not answer in time` in the middle of its body, on the forward path and inside a tunnel alike. Its
    deadline now runs again while the body moves; an origin that stops reading it still gets its 504."""
    idle = 1.0
    stack = make_stack(proxy={"idleTimeout": idle})
    add_rule(stack, container_pattern="*", destination_pattern=HOST, port_pattern="*", action="allow")
    base = f"http://{HOST}:{origin.port}"
    want = hashlib.sha256(open(upload, "rb").read()).hexdigest()
    for tunnel in ([], ["-p"]):
        t0 = time.monotonic()
        out = subprocess.run(
            ["curl", "-s", *tunnel, "-w", " %{http_code}", "--max-time", "20", "--limit-rate", "3M", "-H", "Expect:",
             "-x", stack.http_proxy_url, "--data-binary", "@" + upload, base + "/sha256"],
            capture_output=True, text=True, timeout=30,
        ).stdout  # fmt: skip
        assert time.monotonic() - t0 > 2 * idle  # the upload outlasted the idle timeout
        assert out == f"{want} 200", (tunnel, out)
    t0 = time.monotonic()
    out = subprocess.run(
        ["curl", "-s", "-w", " %{http_code}", "--max-time", "20", "-H", "Expect:", "-x", stack.http_proxy_url,
         "--data-binary", "@" + upload, base + "/stuck"],
        capture_output=True, text=True, timeout=30,
    ).stdout  # fmt: skip
    assert out.endswith(" 504") and "did not answer in time" in out, out
    assert time.monotonic() - t0 < 4 * idle + 3
