"""Issue 13 items 2 and 5 through the real stack: address rules judge names too, and Unicode names.

Item 2: with `deny 127.0.0.0/8 port P`, `http://localhost:P/` (HTTP proxy, CONNECT, SOCKS5 ATYP=3)
is denied like `http://127.0.0.1:P/`, also under a broader allow, with a log entry naming the
deny rule. Item 5: a rule written with a Unicode name is stored in punycode and matches a CONNECT
or SOCKS5 request carrying either form; control characters and bidi overrides are refused.

Clients are real: curl, and raw sockets for CONNECT and SOCKS5 bytes.
"""

from __future__ import annotations

import shutil
import socket
import struct
from collections.abc import Iterator

import httpx
import pytest

from conftest import Stack, add_rule, curl_proxy, log_entries, plain_origin, proxy_connect, wait_for

pytestmark = [pytest.mark.stack, pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required")]

IDN = "日本.example"
IDN_ASCII = "xn--wgv71a.example"


@pytest.fixture(scope="module")
def origins() -> Iterator[tuple[int, int]]:
    """(denied port, open port), both on 127.0.0.1."""
    with plain_origin() as pa, plain_origin() as pb:
        yield pa, pb


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack({"proxy": {"holdTimeout": 1}}) as s:
        yield s


def connect_status(stack: Stack, user: str, target: bytes) -> bytes:
    with proxy_connect(stack, user, target) as s:
        return s.recv(4096).split(b"\r\n", 1)[0]


def socks_reply(stack: Stack, user: str, name: bytes, port: int) -> int:
    with socket.create_connection(("127.0.0.1", stack.socks_port), timeout=10) as s:
        s.sendall(b"\x05\x01\x02")  # username/password
        assert s.recv(2) == b"\x05\x02"
        u = user.encode()
        s.sendall(b"\x01" + bytes([len(u)]) + u + b"\x01x")
        assert s.recv(2) == b"\x01\x00"
        s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", port))
        return s.recv(10)[1]


def test_a_name_is_judged_by_the_address_it_resolves_to(stack: Stack, origins: tuple[int, int]) -> None:
    denied, open_port = origins
    deny = add_rule(
        stack, container_pattern="*", destination_pattern="127.0.0.0/8", port_pattern=str(denied), action="deny"
    )
    # The builtin rules allow `localhost`; the address deny wins over that name allow.
    for url in (f"http://localhost:{denied}/", f"http://127.0.0.1:{denied}/", f"http://LOCALHOST.:{denied}/"):
        assert curl_proxy(stack, url, "addr-a")[0] == "403", url
    assert curl_proxy(stack, f"http://localhost:{open_port}/", "addr-a")[0] == "200"
    assert connect_status(stack, "addr-b", f"localhost:{denied}".encode()).startswith(b"HTTP/1.1 403")
    assert socks_reply(stack, "addr-c", b"localhost", denied) == 0x02  # connection not allowed by ruleset
    assert socks_reply(stack, "addr-c", b"localhost", open_port) == 0x00

    def blocked(container: str) -> list[dict]:
        return [e for e in log_entries(stack, container) if e["result"] == "blocked"]

    entries = wait_for(lambda: len(blocked("addr-a")) == 3 and blocked("addr-a"), 10, message="three blocks")
    assert {e["rule_id"] for e in entries} == {deny["id"]} and {e["reason"] for e in entries} == {"rule"}
    assert {e["destination_host"] for e in entries} == {"localhost", "127.0.0.1"}
    for c, method in (("addr-b", "CONNECT"), ("addr-c", "SOCKS5")):
        e = wait_for(lambda c=c: blocked(c), 10, message=f"{c} block")[0]
        assert e["rule_id"] == deny["id"] and e["method"] == method and e["destination_host"] == "localhost"
    assert stack.get("/api/pending", params={"container": "addr-"}).json()["total"] == 0  # denied, never held


def test_a_broad_allow_does_not_open_a_denied_range(stack: Stack, origins: tuple[int, int]) -> None:
    denied, open_port = origins
    deny = add_rule(
        stack, container_pattern="*", destination_pattern="127.0.0.0/8", port_pattern=str(denied), action="deny"
    )
    add_rule(stack, container_pattern="addr-broad", destination_pattern="*", action="allow")  # specificity 200
    assert curl_proxy(stack, f"http://localhost:{denied}/", "addr-broad")[0] == "403"
    assert curl_proxy(stack, f"http://127.0.0.1:{denied}/", "addr-broad")[0] == "403"  # the literal too
    assert curl_proxy(stack, f"http://localhost:{open_port}/", "addr-broad")[0] == "200"
    entries = wait_for(lambda: [e for e in log_entries(stack, "addr-broad") if e["result"] == "blocked"], 10)
    assert {e["rule_id"] for e in entries} == {deny["id"]}


def test_unicode_rule_names_are_punycode_and_match_both_forms(stack: Stack) -> None:
    r = add_rule(stack, container_pattern="idn", destination_pattern=IDN, port_pattern="443", action="deny")
    assert r["destination_pattern"] == IDN_ASCII
    again = add_rule(stack, container_pattern="idn", destination_pattern=IDN_ASCII, port_pattern="443", action="deny")
    assert again["id"] == r["id"]  # the same rule, whichever form was written
    wild = add_rule(
        stack, container_pattern="idn", destination_pattern="*.日本.example", port_pattern="443", action="deny"
    )
    assert wild["destination_pattern"] == f"*.{IDN_ASCII}"
    for target in (f"{IDN}:443".encode(), f"{IDN_ASCII}:443".encode(), f"www.{IDN}:443".encode()):
        assert connect_status(stack, "idn", target).startswith(b"HTTP/1.1 403"), target
    assert socks_reply(stack, "idn", IDN.encode(), 443) == 0x02
    entries = wait_for(lambda: len(log_entries(stack, "idn")) == 4 and log_entries(stack, "idn"), 10)
    assert {e["destination_host"] for e in entries} == {IDN_ASCII, f"www.{IDN_ASCII}"}
    assert {e["rule_id"] for e in entries} == {r["id"], wild["id"]}
    # Refused in patterns: NUL, a bidi override, wildcards mixed into a Unicode label.
    for bad in ("a\u0000b.example", "\u202egro.elgoog", "日*.example", "exa\u200bmple.com"):
        res = httpx.post(
            stack.url("/api/rules"), json={"container_pattern": "idn", "destination_pattern": bad}, timeout=5
        )
        assert (
            res.status_code == 400 and "destination_pattern" in res.json()["error"] or "label" in res.json()["error"]
        ), bad
    res = httpx.post(
        stack.url("/api/rules"), json={"container_pattern": "a\u202eb", "destination_pattern": "x.example"}, timeout=5
    )
    assert res.status_code == 400 and "container_pattern" in res.json()["error"]
    # A CONNECT naming a bidi override or NUL is a 400, never a pending entry.
    assert connect_status(stack, "idn", "\u202eevil.example:443".encode()).startswith(b"HTTP/1.1 400")
