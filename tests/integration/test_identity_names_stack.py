"""Identities that cannot be borrowed (SPEC §1, §16), through the real stack:

- a presented proxy user name of the reserved `unknown-…` namespace never stands for another
  address's unnamed client: over HTTP, CONNECT and SOCKS5 the connection is its own unnamed
  client (`unknown-<its address>`), as if it had given no name;
- a non-ASCII name sent in latin-1 (python-requests, pip) is that name, not `unknown-<ip>`;
- releasing a claim ends the credential sessions bound to it: a placeholder of such a session is
  no longer substituted for whoever presents the released name.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest

from conftest import PYTHON, OriginHandler, Stack, add_rule, log_entries, plain_origin, wait_for

pytestmark = [pytest.mark.stack, pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required")]


class KeyEcho(OriginHandler):
    """200 with the x-api-key header it received (what a substituted placeholder became)."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.reply(json.dumps({"x-api-key": self.headers.get("x-api-key")}).encode(), "application/json")


@pytest.fixture(scope="module")
def origin() -> Iterator[int]:
    with plain_origin(KeyEcho) as port:
        yield port


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # No builtin loopback allows: the origin is reached only through a rule for the name.
    with Stack({"proxy": {"holdTimeout": 1}, "greyproxy": {"builtinRules": False}}) as s:
        yield s


def _curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-s", "--max-time", "10", *args], capture_output=True, text=True, timeout=20)


def _socks_reply(stack: Stack, user: bytes, port: int) -> int:
    """The SOCKS5 CONNECT reply code to 127.0.0.1:port as `user` (any password)."""
    with socket.create_connection(("127.0.0.1", stack.socks_port), timeout=10) as s:
        s.sendall(b"\x05\x01\x02")
        assert s.recv(2) == b"\x05\x02"
        s.sendall(b"\x01" + bytes([len(user)]) + user + b"\x01x")
        assert s.recv(2) == b"\x01\x00"
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", port))
        return s.recv(10)[1]


def test_an_unknown_name_is_the_clients_own_never_another_address(stack: Stack, origin: int) -> None:
    borrowed = "unknown-10.9.9.9"
    for container, action in ((borrowed, "allow"), ("unknown-127.0.0.1", "deny")):
        add_rule(
            stack,
            container_pattern=container,
            destination_pattern="127.0.0.1",
            port_pattern=str(origin),
            action=action,
        )
    url = f"http://127.0.0.1:{origin}/"
    proxy = f"127.0.0.1:{stack.ports['http-proxy']}"
    http = _curl("-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://{borrowed}:x@{proxy}", url)
    assert http.stdout == "403", http
    tunnel = _curl("-o", "/dev/null", "-w", "%{http_code}", "-p", "-x", f"http://{borrowed}:x@{proxy}", url)
    assert tunnel.stdout in ("403", "000"), tunnel  # (curl: the CONNECT was refused with 403)
    assert _socks_reply(stack, borrowed.encode(), origin) == 2  # not allowed by the rule
    rows = wait_for(
        lambda: (
            (r := [e for e in log_entries(stack, "unknown-127.0.0.1") if e["result"] == "blocked"])
            and len(r) >= 3
            and r
        ),
        10,
        message="three entries of the client's own unnamed identity",
    )
    assert {r["method"] for r in rows} == {"HTTP", "CONNECT", "SOCKS5"}, rows
    assert all(r["container_name"] == "unknown-127.0.0.1" for r in rows), rows
    assert log_entries(stack, borrowed) == []  # nobody was that client


def test_a_latin1_name_from_python_requests_is_that_name(stack: Stack, origin: int) -> None:
    pytest.importorskip("requests")
    add_rule(stack, container_pattern="ü-agent", destination_pattern="127.0.0.1", port_pattern=str(origin))
    proxy = f"http://%C3%BC-agent:x@127.0.0.1:{stack.ports['http-proxy']}"  # (as `greyproxy env` writes it)
    code = subprocess.run(
        [
            PYTHON,
            "-c",
            "import requests, sys; "
            "print(requests.get(sys.argv[1], proxies={'http': sys.argv[2]}, timeout=10).status_code)",
            f"http://127.0.0.1:{origin}/",
            proxy,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert code.stdout.strip() == "200", code
    entry = wait_for(lambda: [e for e in log_entries(stack, "-agent") if e["result"] == "allowed"], 10)
    assert entry[0]["container_name"] == "ü-agent", entry


def test_releasing_a_claim_ends_the_sessions_bound_to_it(stack: Stack, origin: int) -> None:
    name, sid = "bound-agent", "gw-bound1"
    secret = stack.request("POST", "/api/identities", json={"name": name}).json()["secret"]
    ph = f"greyproxy:credential:v1:{sid}:{'ab' * 16}"
    r = stack.request(
        "POST",
        "/api/sessions",
        json={
            "session_id": sid,
            "container_name": name,
            "mappings": {ph: "REAL-VALUE"},
            "hosts": {ph: ["127.0.0.1"]},
            "ttl_seconds": 600,
        },
    )
    assert r.status_code == 200, r.text
    add_rule(stack, container_pattern=name, destination_pattern="127.0.0.1", port_pattern=str(origin))
    url = f"http://127.0.0.1:{origin}/"
    proxy = f"127.0.0.1:{stack.ports['http-proxy']}"

    def as_name(password: str) -> subprocess.CompletedProcess:
        return _curl("-w", "\n%{http_code}", "-H", f"x-api-key: {ph}", "-x", f"http://{name}:{password}@{proxy}", url)

    with_secret = as_name(secret)
    assert with_secret.stdout.endswith("\n200") and "REAL-VALUE" in with_secret.stdout, with_secret
    assert as_name("x").stdout.endswith("\n407")

    assert stack.request("DELETE", f"/api/identities/{name}").status_code == 204
    assert sid not in [s["session_id"] for s in stack.get("/api/sessions").json()]
    after = as_name("x")  # the name is anyone's now: the session's value goes to no one
    assert "REAL-VALUE" not in after.stdout, after
    assert after.stdout.endswith("\n403"), after  # (an unknown placeholder: refused, never sent on)
    time.sleep(2.5)  # past the proxy's credential version check: still gone
    assert "REAL-VALUE" not in as_name("x").stdout
