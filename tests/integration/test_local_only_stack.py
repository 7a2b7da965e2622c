"""Local API protection through the real stack, with real clients (httpx, websockets).

A page on another site must not drive the API: not by DNS rebinding (its own name resolving to
127.0.0.1, so our socket sees a foreign Host), nor by a cross-site request or WebSocket (a
foreign Origin). Clients without an Origin (curl, scripts) keep working, and so do the names
listed in greyproxy.allowedHosts.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import orjson
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from conftest import Stack

pytestmark = pytest.mark.stack

EXTRA_HOST = "greyproxy.test"
EVIL = "http://evil.example"
RULE = {"container_pattern": "prot", "destination_pattern": "protection.example.com", "port_pattern": "443"}


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack({"greyproxy": {"allowedHosts": [EXTRA_HOST]}}) as s:
        yield s


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5, trust_env=False) as c:
        yield c


def rules_named(stack: Stack, client: httpx.Client) -> list[dict]:
    items = client.get(stack.url("/api/rules"), params={"container": "prot"}).json()["items"]
    return [r for r in items if r["container_pattern"] == "prot"]


def test_foreign_host_is_misdirected(stack: Stack, client: httpx.Client) -> None:
    port = stack.ports["api"]
    for host in ("evil.example", f"evil.example:{port}", f"localhost.evil.example:{port}"):
        for method, path in (
            ("GET", "/api/health"),
            ("GET", "/api/rules"),
            ("POST", "/api/rules"),
            ("GET", "/api/no-such-route"),
            ("GET", "/api/openapi.json"),
        ):
            r = client.request(method, stack.url(path), headers={"Host": host}, json=RULE if method == "POST" else None)
            assert r.status_code == 421, (host, method, path, r.status_code)
            assert r.headers["content-type"].startswith("application/json")
            assert set(r.json()) == {"error"} and "Host" in r.json()["error"]
    assert rules_named(stack, client) == []  # nothing was created by the refused POSTs


def test_local_and_allowed_hosts_are_served(stack: Stack, client: httpx.Client) -> None:
    port = stack.ports["api"]
    for host in (
        f"127.0.0.1:{port}",
        f"localhost:{port}",
        "localhost",
        f"[::1]:{port}",
        "127.0.0.1",
        EXTRA_HOST,
        f"{EXTRA_HOST}:{port}",
    ):
        r = client.get(stack.url("/api/pending/count"), headers={"Host": host})
        assert r.status_code == 200 and "count" in r.json(), (host, r.status_code, r.text)


def test_cross_origin_writes_are_forbidden_and_plain_clients_are_not(stack: Stack, client: httpx.Client) -> None:
    port = stack.ports["api"]
    for origin in (EVIL, f"{EVIL}:{port}", "null"):
        r = client.post(stack.url("/api/rules"), json=RULE, headers={"Origin": origin})
        assert r.status_code == 403, (origin, r.status_code)
        assert set(r.json()) == {"error"}
        r = client.delete(stack.url("/api/allowall"), headers={"Origin": origin})
        assert r.status_code == 403
    # The browser's fetch metadata alone is enough for a write, whatever the Origin says.
    r = client.post(
        stack.url("/api/rules"),
        json=RULE,
        headers={"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "cross-site"},
    )
    assert r.status_code == 403 and "Sec-Fetch-Site" in r.json()["error"]
    assert rules_named(stack, client) == []

    # No Origin (curl, scripts, SDKs): works.
    r = client.post(stack.url("/api/rules"), json=RULE)
    assert r.status_code == 201, r.text
    # Same origin (a loopback host form or an allowed name, on the API's port): works.
    for origin, host in (
        (f"http://127.0.0.1:{port}", None),
        (f"http://localhost:{port}", None),
        (f"http://{EXTRA_HOST}:{port}", f"{EXTRA_HOST}:{port}"),
    ):
        headers = {"Origin": origin, "Sec-Fetch-Site": "same-origin"}
        if host:
            headers["Host"] = host
        r = client.post(stack.url("/api/rules"), json=RULE, headers=headers)
        assert r.status_code == 201, (origin, r.text)  # the identical active rule comes back
    # Another port is another origin (issue 13 item 1): a dev server page on localhost:5173 is refused.
    r = client.post(
        stack.url("/api/rules"), json=RULE, headers={"Origin": "http://localhost:5173", "Sec-Fetch-Site": "same-site"}
    )
    assert r.status_code == 403, r.text
    rules = rules_named(stack, client)
    assert len(rules) == 1
    r = client.delete(stack.url(f"/api/rules/{rules[0]['id']}"), headers={"Origin": f"http://[::1]:{port}"})
    assert r.json() == {"status": "ok", "deleted": True}


def test_cross_origin_reads_are_forbidden_too(stack: Stack, client: httpx.Client) -> None:
    # Without CORS a foreign page could not read the answer anyway; refusing keeps it from
    # making us work at all. A navigation from another site (no Origin) still reads.
    r = client.get(stack.url("/api/rules"), headers={"Origin": EVIL})
    assert r.status_code == 403 and set(r.json()) == {"error"}
    assert "access-control-allow-origin" not in r.headers
    r = client.get(stack.url("/api/rules"), headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    assert client.get(stack.url("/api/rules")).status_code == 200


def ws_url(stack: Stack) -> str:
    return stack.api.replace("http://", "ws://", 1) + "/ws"


def test_websocket_upgrade_is_checked_the_same_way(stack: Stack) -> None:
    port = stack.ports["api"]
    for headers in ({"origin": EVIL}, {"origin": f"{EVIL}:{port}"}):
        with pytest.raises(InvalidStatus) as info, connect(ws_url(stack), open_timeout=5, **headers):
            pass
        assert info.value.response.status_code == 403
    with (
        pytest.raises(InvalidStatus) as info,
        connect(
            ws_url(stack),
            open_timeout=5,
            origin=f"http://127.0.0.1:{port}",
            additional_headers={"Sec-Fetch-Site": "cross-site"},
        ),
    ):
        pass
    assert info.value.response.status_code == 403
    # DNS rebinding: the right address, a foreign name.
    sock = socket.create_connection(("127.0.0.1", port))
    with pytest.raises(InvalidStatus) as info, connect(f"ws://evil.example:{port}/ws", sock=sock, open_timeout=5):
        pass
    assert info.value.response.status_code == 421  # the refusal's own status, as for plain HTTP
    # Without an Origin, with a local one, and under an allowed name: connected.
    for kw in ({}, {"origin": f"http://localhost:{port}"}):
        with connect(ws_url(stack), open_timeout=5, **kw) as c:
            assert orjson.loads(c.recv(timeout=5))["type"] == "connected"
    sock = socket.create_connection(("127.0.0.1", port))
    with connect(f"ws://{EXTRA_HOST}:{port}/ws", sock=sock, origin=f"http://{EXTRA_HOST}:{port}", open_timeout=5) as c:
        assert orjson.loads(c.recv(timeout=5))["type"] == "connected"


def test_plain_get_on_the_websocket_route(stack: Stack, client: httpx.Client) -> None:
    r = client.get(stack.url("/ws"))
    assert r.status_code == 426 and r.headers.get("upgrade") == "websocket" and "error" in r.json()
