"""SPEC §16 claimed identities through the real stack: a claimed name needs its secret (HTTP 407,
SOCKS5 auth failure 0x01), with it the name's rules apply, unclaimed names take any password as
before, rotation makes the old secret fail at once, and the secret is nowhere at rest (data dir
with -wal/-shm, logs) nor in any /ws event after it was handed out.

Clients are real: curl for HTTP, raw sockets for SOCKS5 bytes, websockets for /ws.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.sync.client import connect as ws_connect

from conftest import Stack, add_rule, curl_proxy, log_entries, plain_origin, wait_for

pytestmark = [pytest.mark.stack, pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required")]


@pytest.fixture(scope="module")
def origin() -> Iterator[int]:
    with plain_origin() as port:
        yield port


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # No builtin loopback allows: the origin is reached only through a rule for the name.
    with Stack({"proxy": {"holdTimeout": 1}, "greyproxy": {"builtinRules": False}}) as s:
        yield s


class WsTap:
    """Every /ws message received while the test runs (a secret must never be in one)."""

    def __init__(self, stack: Stack) -> None:
        self.messages: list[str] = []
        self._conn = ws_connect(f"ws://127.0.0.1:{stack.ports['api']}/ws", open_timeout=5, legacy=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for msg in self._conn:
                self.messages.append(msg if isinstance(msg, str) else msg.decode("utf-8", "replace"))
        except Exception:  # noqa: BLE001 - closed at the end of the test
            pass

    def close(self) -> None:
        self._conn.close()
        self._thread.join(5)


def curl(stack: Stack, user: str, password: str | None, url: str) -> tuple[str, str]:
    """(status code, response head) of `curl --proxy-user user[:password]` through the HTTP proxy."""
    cred = user if password is None else f"{user}:{password}"
    return curl_proxy(stack, url, None, None, "--proxy-user", cred, head=True)


def socks(stack: Stack, user: str, password: str, port: int) -> tuple[int, int | None]:
    """(auth status, CONNECT reply code or None when auth failed) for 127.0.0.1:port."""
    with socket.create_connection(("127.0.0.1", stack.socks_port), timeout=10) as s:
        s.sendall(b"\x05\x01\x02")
        assert s.recv(2) == b"\x05\x02"
        u, p = user.encode(), password.encode()
        s.sendall(b"\x01" + bytes([len(u)]) + u + bytes([len(p)]) + p)
        status = s.recv(2)
        assert status[0] == 1, status
        if status[1] != 0:
            assert s.recv(1) == b""  # closed after the failure
            return status[1], None
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", port))
        return 0, s.recv(10)[1]


def allow(stack: Stack, container: str, port: int) -> None:
    add_rule(
        stack, container_pattern=container, destination_pattern="127.0.0.1", port_pattern=str(port), action="allow"
    )


def claim(stack: Stack, name: str) -> str:
    r = stack.request("POST", "/api/identities", json={"name": name, "notes": "test"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["name"] == name and body["created_at"]
    secret = body["secret"]
    assert len(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))) == 32
    return secret


def test_claimed_name_needs_its_secret(stack: Stack, origin: int) -> None:
    tap = WsTap(stack)
    url = f"http://127.0.0.1:{origin}/"
    allow(stack, "agent-a", origin)
    assert curl(stack, "agent-a", "anything", url)[0] == "200"  # unclaimed: any password, as before
    secret = claim(stack, "agent-a")

    code, head = curl(stack, "agent-a", "wrong", url)
    assert code == "407" and 'Proxy-Authenticate: Basic realm="greyproxy"' in head
    assert curl(stack, "agent-a", None, url)[0] == "407"  # no password
    assert curl(stack, "agent-a", secret, url)[0] == "200"  # with the secret: its rules apply
    assert curl(stack, "agent-b", "whatever", url)[0] == "403"  # another (unclaimed) name: its own rules
    # CONNECT too (the tunnel is refused before it is decided).
    with socket.create_connection(("127.0.0.1", stack.ports["http-proxy"]), timeout=10) as s:
        auth = base64.b64encode(b"agent-a:nope").decode()
        s.sendall(
            f"CONNECT 127.0.0.1:{origin} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode()
        )
        assert s.recv(4096).startswith(b"HTTP/1.1 407")

    assert socks(stack, "agent-a", "wrong", origin) == (1, None)
    assert socks(stack, "agent-a", secret, origin) == (0, 0)
    assert socks(stack, "agent-c", "any", origin) == (0, 2)  # unclaimed, no rule: not allowed (hold timeout)

    refused = wait_for(
        lambda: (
            len([e for e in log_entries(stack, "agent-a") if e["reason"] == "identity_refused"]) >= 4
            and log_entries(stack, "agent-a")
        ),
        10,
        message="refusal log entries",
    )
    assert {e["result"] for e in refused if e["reason"] == "identity_refused"} == {"blocked"}
    wait_for(lambda: sum('"identity.refused"' in m for m in tap.messages) >= 4, 10, message="identity.refused events")
    listed = stack.get("/api/identities").json()
    assert [i["name"] for i in listed["items"]] == ["agent-a"] and "secret" not in json.dumps(listed)
    wait_for(
        lambda: stack.get("/api/identities").json()["items"][0]["last_used_at"] is not None,
        20,
        message="last use recorded",
    )

    # Rotation: the old secret fails at once, the new one works.
    r = stack.request("POST", "/api/identities/agent-a/rotate")
    assert r.status_code == 200, r.text
    new = r.json()["secret"]
    assert new != secret
    assert curl(stack, "agent-a", secret, url)[0] == "407"
    assert socks(stack, "agent-a", secret, origin) == (1, None)
    assert curl(stack, "agent-a", new, url)[0] == "200"

    # Nowhere at rest, nor on /ws, after it was handed out.
    assert stack.request("POST", "/api/identities", json={"name": "agent-a"}).status_code == 409
    tap.close()
    needles = [s.encode() for s in (secret, new)] + [base64.b64encode(f"agent-a:{s}".encode()) for s in (secret, new)]
    files = [p for p in (stack.data_dir).rglob("*") if p.is_file()] + [stack.serve_log]
    for path in files:
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, f"secret found in {path}"
    for m in tap.messages:
        for needle in needles:
            assert needle.decode() not in m

    # Released: the name is anyone's again.
    assert stack.request("DELETE", "/api/identities/agent-a").status_code == 204
    assert curl(stack, "agent-a", "anything", url)[0] == "200"
    assert stack.request("DELETE", "/api/identities/agent-a").status_code == 404
    assert stack.request("POST", "/api/identities/agent-a/rotate").status_code == 404


def test_bad_names_are_refused(stack: Stack) -> None:
    for bad in ("", "a:b", "proxy", "unknown-1.2.3.4", " x", "x" * 200, 5, None):
        r = stack.request("POST", "/api/identities", json={"name": bad})
        assert r.status_code == 400, (bad, r.text)


def env_claim(stack: Stack, name: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "greyproxy",
            "env",
            "--container",
            name,
            "--claim",
            "--no-ca",
            "-C",
            str(stack.cfg_path),
        ],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr + stack.logs(80)
    return done


def test_env_claim_prints_urls_with_the_secret(stack: Stack, origin: int) -> None:
    allow(stack, "env-agent", origin)
    done = env_claim(stack, "env-agent")
    line = next(x for x in done.stdout.splitlines() if "HTTP_PROXY=" in x and "http://" in x)
    proxy = line.split("=", 1)[1].strip().strip("'\"")
    assert proxy.startswith("http://env-agent:")
    secret = proxy.split("//", 1)[1].split("@", 1)[0].split(":", 1)[1]
    assert curl(stack, "env-agent", secret, f"http://127.0.0.1:{origin}/")[0] == "200"
    assert curl(stack, "env-agent", "guess", f"http://127.0.0.1:{origin}/")[0] == "407"
    # Again: the claim is rotated, the earlier secret no longer works.
    env_claim(stack, "env-agent")
    assert curl(stack, "env-agent", secret, f"http://127.0.0.1:{origin}/")[0] == "407"
    assert Path(stack.db_path).exists()


def test_a_name_with_a_slash_is_rotated_and_released_through_uvicorn(stack: Stack, origin: int) -> None:
    """A name with '/' (tester C #3) over the real server, which decodes %2F before routing:
    `greyproxy env --claim` claims it, and again rotates it (it answered 404 and exited 2);
    DELETE releases it, with the '/' raw or as %2F."""
    allow(stack, "team/slash", origin)
    done = env_claim(stack, "team/slash")
    line = next(x for x in done.stdout.splitlines() if "HTTP_PROXY=" in x and "http://" in x)
    secret = line.split("=", 1)[1].strip().strip("'\"").split("//", 1)[1].split("@", 1)[0].split(":", 1)[1]
    assert curl(stack, "team/slash", secret, f"http://127.0.0.1:{origin}/")[0] == "200"
    env_claim(stack, "team/slash")  # claimed already: rotated
    assert curl(stack, "team/slash", secret, f"http://127.0.0.1:{origin}/")[0] == "407"
    assert stack.request("DELETE", "/api/identities/team%2Fslash").status_code == 204
    assert all(i["name"] != "team/slash" for i in stack.get("/api/identities").json()["items"])
    assert stack.request("POST", "/api/identities", json={"name": "team/slash"}).status_code == 201
    assert stack.request("DELETE", "/api/identities/team/slash").status_code == 204


def _http_get(sock: socket.socket, origin: int, user: str, password: str) -> bytes:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    sock.sendall(
        f"GET http://127.0.0.1:{origin}/ HTTP/1.1\r\nHost: 127.0.0.1:{origin}\r\n"
        f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode()
    )
    data = b""
    while b"\r\n\r\n" not in data or (data.startswith(b"HTTP/1.1 200") and not data.endswith(b"reached\n")):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_rotation_ends_kept_alive_connections_and_tunnels(stack: Stack, origin: int) -> None:
    allow(stack, "keep-agent", origin)
    secret = claim(stack, "keep-agent")
    with (
        socket.create_connection(("127.0.0.1", stack.ports["http-proxy"]), timeout=10) as kept,
        socket.create_connection(("127.0.0.1", stack.ports["http-proxy"]), timeout=10) as tunnel,
    ):
        assert _http_get(kept, origin, "keep-agent", secret).startswith(b"HTTP/1.1 200")
        auth = base64.b64encode(f"keep-agent:{secret}".encode()).decode()
        tunnel.sendall(
            f"CONNECT 127.0.0.1:{origin} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode()
        )
        assert tunnel.recv(4096).startswith(b"HTTP/1.1 200")
        claim(stack, "keep-other")  # the claims change, but not this name's: its connections go on
        assert _http_get(kept, origin, "keep-agent", secret).startswith(b"HTTP/1.1 200")
        assert stack.request("POST", "/api/identities/keep-agent/rotate").status_code == 200
        # The same kept-alive connection, the same (old) secret: refused from the rotation's answer on
        # (a connection of the name that still holds an upstream is closed by the rotation; one that does
        # not would get the 407 at its next request).
        try:
            again = _http_get(kept, origin, "keep-agent", secret)
        except ConnectionResetError:
            again = b""
        assert again == b"" or again.startswith(b"HTTP/1.1 407"), again[:100]
        # The open tunnel of the rotated name was closed.
        tunnel.settimeout(5)
        try:
            assert tunnel.recv(4096) == b""
        except ConnectionResetError:
            pass


def test_every_worker_enforces_the_claim_and_its_rotation(origin: int) -> None:
    """proxy.workers: 2: the kernel spreads new connections over both workers; each must refuse a
    claimed name without its secret, and the old secret after a rotation, at once."""
    with Stack({"proxy": {"workers": 2, "holdTimeout": 1}, "greyproxy": {"builtinRules": False}}) as s:
        allow(s, "w-agent", origin)
        secret = claim(s, "w-agent")
        url = f"http://127.0.0.1:{origin}/"
        assert {curl(s, "w-agent", "wrong", url)[0] for _ in range(8)} == {"407"}
        assert {curl(s, "w-agent", secret, url)[0] for _ in range(8)} == {"200"}
        r = s.request("POST", "/api/identities/w-agent/rotate")
        assert r.status_code == 200, r.text
        assert {curl(s, "w-agent", secret, url)[0] for _ in range(8)} == {"407"}
        assert {curl(s, "w-agent", r.json()["secret"], url)[0] for _ in range(8)} == {"200"}
        per_worker = [w for w in s.get("/api/health").json().get("services", {}).get("proxy", {}).get("workers", [])]
        assert len(per_worker) == 2
