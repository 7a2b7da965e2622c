"""Issue 13 through the real stack: who may drive the API, and what its answers look like.

- Origins (item 1): only the API's own origin (scheme, loopback host form AND port) or one listed
  in greyproxy.allowedOrigins; a browser write with a body must be application/json (415);
  curl and scripts keep working with any content type; the same for the /ws upgrade.
- The HTTP front door (item 6): two Host headers, an absolute-form target, a port out of range,
  an HTTP/0.9 request line, a spoofed X-Forwarded-For.
- Rule input (item 6): unknown fields, builtin rules; invalid ids (item 10).
- Contract details: `?container=` a substring (item 8), integer milliseconds (item 9).
- A path prefix (item 12) and builtin rules switched off in the config (item 6).

Clients are real: httpx, raw sockets where the exact bytes matter, websockets, curl.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from conftest import HelloHandler, Stack, curl_proxy, plain_origin, wait_for

pytestmark = [pytest.mark.stack, pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required")]

LISTED = "http://tool.localhost:5555"  # greyproxy.allowedOrigins
FOREIGN_LOCAL = "http://localhost:3000"  # a dev server or notebook on this machine: another origin
ORIGIN_HOST = "127.0.0.2"  # no builtin rule covers it
RULE = {"container_pattern": "trust", "destination_pattern": "trust.example.com", "port_pattern": "443"}


@pytest.fixture(scope="module")
def origin() -> Iterator[int]:
    with plain_origin(HelloHandler, ORIGIN_HOST) as port:
        yield port


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack({"greyproxy": {"allowedOrigins": [LISTED]}, "proxy": {"holdTimeout": 1}}) as s:
        yield s


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5, trust_env=False) as c:
        yield c


def own(stack: Stack, host: str = "localhost") -> str:
    return f"http://{host}:{stack.ports['api']}"


def trust_rules(stack: Stack, client: httpx.Client) -> list[dict]:
    items = client.get(stack.url("/api/rules"), params={"container": "trust", "limit": 1000}).json()["items"]
    return [r for r in items if r["container_pattern"] == "trust"]


def raw(stack: Stack, data: bytes) -> tuple[int, bytes]:
    """Send bytes to the API; (status, body) of the answer."""
    with socket.create_connection(("127.0.0.1", stack.ports["api"]), timeout=5) as s:
        s.sendall(data)
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            head, sep, body = buf.partition(b"\r\n\r\n")
            if sep and b"content-length:" in head.lower():
                n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(body) >= n:
                    break
    status = int(buf.split(b" ", 2)[1])
    return status, buf.partition(b"\r\n\r\n")[2]


def api_log(stack: Stack) -> str:
    return (stack.data_dir / "logs" / "api.log").read_text(errors="replace")


# ----------------------------------------------------------------------------- item 1: origins


def test_a_page_on_another_local_port_cannot_drive_the_api(stack: Stack, client: httpx.Client) -> None:
    # The review's attack: a dev server page on localhost:3000, same *site*, text/plain carrying JSON.
    body = orjson.dumps(RULE)
    for org in (FOREIGN_LOCAL, f"http://127.0.0.1:{stack.ports['api'] + 1}", f"https://localhost:{stack.ports['api']}"):
        hdrs = {"Origin": org, "Sec-Fetch-Site": "same-site", "Content-Type": "text/plain"}
        r = client.post(stack.url("/api/rules"), content=body, headers=hdrs)
        assert r.status_code == 403 and "Origin" in r.json()["error"], (org, r.status_code, r.text)
        r = client.post(stack.url("/api/allowall"), content=b'{"mode": "allow"}', headers=hdrs)
        assert r.status_code == 403, (org, r.status_code)
        r = client.get(stack.url("/api/rules"), headers={"Origin": org})
        assert r.status_code == 403
    assert trust_rules(stack, client) == []
    assert client.get(stack.url("/api/allowall")).json()["active"] is False


def test_browser_writes_must_be_json_and_scripts_need_not(stack: Stack, client: httpx.Client) -> None:
    body = orjson.dumps(RULE)
    # Our own page (and a listed origin): a text/plain or form body is refused (415), JSON passes.
    for org in (own(stack), own(stack, "127.0.0.1"), LISTED):
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            r = client.post(stack.url("/api/rules"), content=body, headers={"Origin": org, "Content-Type": ctype})
            assert r.status_code == 415 and "application/json" in r.json()["error"], (org, ctype, r.status_code)
    # Fetch metadata alone marks a browser too (a same-origin fetch may omit Origin on a GET, not on writes).
    r = client.post(
        stack.url("/api/rules"),
        content=body,
        headers={"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors", "Content-Type": "text/plain"},
    )
    assert r.status_code == 415
    assert trust_rules(stack, client) == []
    r = client.post(
        stack.url("/api/rules"),
        content=body,
        headers={"Origin": own(stack), "Content-Type": "application/json; charset=utf-8"},
    )
    assert r.status_code == 201, r.text
    r = client.post(
        stack.url("/api/rules"), content=body, headers={"Origin": LISTED, "Content-Type": "application/json"}
    )
    assert r.status_code == 201, r.text
    # curl and scripts: no Origin, no Sec-Fetch-*: any content type (the README's `curl -d` examples).
    done = subprocess.run(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            stack.url("/api/allowall"),
            "-d",
            '{"mode": "allow", "duration_seconds": 60}',
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert done.stdout == "200", done
    assert client.get(stack.url("/api/allowall")).json()["active"] is True
    assert client.delete(stack.url("/api/allowall"), headers={"Origin": own(stack)}).status_code == 200  # no body
    for rule in trust_rules(stack, client):
        client.delete(stack.url(f"/api/rules/{rule['id']}"))


def test_ws_upgrade_follows_the_origin_rule(stack: Stack) -> None:
    url = f"ws://127.0.0.1:{stack.ports['api']}/ws"
    for org in (FOREIGN_LOCAL, f"http://localhost:{stack.ports['api'] + 1}", "http://evil.example"):
        with pytest.raises(InvalidStatus) as info, connect(url, origin=org, open_timeout=5):
            pass
        assert info.value.response.status_code == 403, org
    for org in (own(stack), own(stack, "127.0.0.1"), LISTED, None):
        with connect(url, origin=org, open_timeout=5) as c:
            assert orjson.loads(c.recv(timeout=5))["type"] == "connected", org


# ----------------------------------------------------------------------------- item 6: the front door


def test_malformed_requests_are_400_without_a_traceback(stack: Stack) -> None:
    port = stack.ports["api"]
    status, body = raw(
        stack, f"GET /api/health HTTP/1.1\r\nHost: localhost:{port}\r\nHost: evil.example\r\n\r\n".encode()
    )
    assert status == 400 and "Host" in orjson.loads(body)["error"]
    status, body = raw(stack, b"GET /api/health\r\n\r\n")  # HTTP/0.9
    assert status == 400 and "version" in orjson.loads(body)["error"]
    for host in ("localhost:99999", "localhost:0", "[::1]:70000", "127.0.0.1:-1"):
        status, body = raw(stack, f"GET /api/health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert status == 400 and set(orjson.loads(body)) == {"error"}, host
    # An absolute-form target names the host the request is for: it is judged, not the Host header.
    status, body = raw(stack, f"GET http://evil.example:{port}/api/health HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    assert status == 421, body
    status, _ = raw(stack, f"GET http://localhost:{port}/api/health HTTP/1.1\r\nHost: evil.example\r\n\r\n".encode())
    assert status == 200
    assert client_ok(stack)  # the API is still fine
    assert "Traceback" not in api_log(stack)


def test_a_body_cut_short_by_a_client_leaving_is_never_acted_on(stack: Stack) -> None:
    """A client that closes its side before its body ended (fewer bytes than its Content-Length, or
    a chunked body without its last chunk): the body it sent parses (a whole JSON object), but it is
    not the request the client meant to send, so no rule is made from it (the API made one, and
    answered nobody)."""
    dest = f"cut-{time.monotonic_ns()}.example"
    body = orjson.dumps({"container_pattern": "cutter", "destination_pattern": dest, "action": "allow"})
    start = b"POST /api/rules HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    for sent in (
        start + f"Content-Length: {len(body) + 5}\r\n\r\n".encode() + body,
        # chunked: one whole chunk and no last one; a chunk longer than what came of it
        start + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (len(body), body),
        start + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s" % (len(body) + 30, body),
    ):
        with socket.create_connection(("127.0.0.1", stack.ports["api"]), timeout=5) as s:
            s.sendall(sent)
            s.shutdown(socket.SHUT_WR)  # nothing more comes
            with contextlib.suppress(OSError):
                while s.recv(4096):
                    pass
    time.sleep(0.5)
    assert stack.get("/api/rules", params={"destination": dest}).json()["total"] == 0
    assert client_ok(stack)
    whole = stack.request("POST", "/api/rules", json=orjson.loads(body))  # the same body sent whole: made
    assert whole.status_code == 201 and stack.get("/api/rules", params={"destination": dest}).json()["total"] == 1


def client_ok(stack: Stack) -> bool:
    return stack.get("/api/health").status_code == 200


def test_forwarded_for_is_not_trusted(stack: Stack) -> None:
    # A refused request is logged with the peer address; X-Forwarded-For must not rewrite it. (The one
    # cross-site refusal of this module: refusals of one kind are logged once per 10 s.)
    marker = "/api/xff-probe"
    status, _ = raw(
        stack,
        (
            f"POST {marker} HTTP/1.1\r\nHost: localhost\r\nOrigin: {own(stack)}\r\n"
            "Sec-Fetch-Site: cross-site\r\nX-Forwarded-For: 203.0.113.9\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode(),
    )
    assert status == 403
    line = wait_for(
        lambda: next((ln for ln in api_log(stack).splitlines() if marker in ln), None),
        5,
        message="the refusal in api.log",
    )
    assert "127.0.0.1" in line and "203.0.113.9" not in line, line


# ----------------------------------------------------------------------------- item 6 and 10: rule input


def test_unknown_rule_fields_are_named(stack: Stack, client: httpx.Client) -> None:
    r = client.post(stack.url("/api/rules"), json={**RULE, "acton": "deny", "expires": "1h"})
    assert r.status_code == 400 and "'acton'" in r.json()["error"] and "'expires'" in r.json()["error"], r.text
    assert trust_rules(stack, client) == []
    rule = client.post(stack.url("/api/rules"), json=RULE).json()
    r = client.put(stack.url(f"/api/rules/{rule['id']}"), json={"acton": "deny"})
    assert r.status_code == 400 and "'acton'" in r.json()["error"]
    assert client.get(stack.url(f"/api/rules/{rule['id']}")).json()["action"] == "allow"
    for bad in ({"from_date": "yesterday"}, {"to_date": "2026-13-45T00:00:00Z"}, {"from_date": "1700000000"}):
        for path in ("/api/logs", "/api/transactions", "/api/logs/stats"):
            r = client.get(stack.url(path), params=bad)
            assert r.status_code == 400 and next(iter(bad)) in r.json()["error"], (path, bad, r.text)
    client.delete(stack.url(f"/api/rules/{rule['id']}"))


def test_builtin_rules_cannot_be_edited(stack: Stack, client: httpx.Client) -> None:
    builtins = [
        r
        for r in client.get(stack.url("/api/rules"), params={"limit": 1000}).json()["items"]
        if r["source"] == "builtin"
    ]
    assert {r["destination_pattern"] for r in builtins} == {"localhost", "127.0.0.1", "::1"}
    for change in ({"action": "deny"}, {"destination_pattern": "*"}, {"notes": "mine now"}):
        r = client.put(stack.url(f"/api/rules/{builtins[0]['id']}"), json=change)
        assert r.status_code == 400 and "builtin rule" in r.json()["error"], (change, r.text)
    after = client.get(stack.url(f"/api/rules/{builtins[0]['id']}")).json()
    assert after["action"] == "allow" and after["destination_pattern"] == builtins[0]["destination_pattern"]


def test_ids_that_are_not_integers_are_400(stack: Stack, client: httpx.Client) -> None:
    for method, path in (
        ("GET", "/api/rules/abc"),
        ("PUT", "/api/rules/1.5"),
        ("DELETE", "/api/rules/-3"),
        ("GET", "/api/transactions/x1"),
        ("POST", "/api/pending/abc/allow"),
        ("DELETE", "/api/pending/1e3"),
    ):
        r = client.request(method, stack.url(path), json={} if method in ("PUT", "POST") else None)
        assert r.status_code == 400 and r.json() == {"error": "invalid id"}, (method, path, r.status_code, r.text)
    assert client.get(stack.url("/api/rules/999999")).status_code == 404  # an integer id: not found


# ----------------------------------------------------------------------------- items 8 and 9


def test_container_filter_is_a_substring_and_times_are_integers(
    stack: Stack, client: httpx.Client, origin: int
) -> None:
    client.post(stack.url("/api/rules"), json={"container_pattern": "*", "destination_pattern": ORIGIN_HOST})
    for user in ("team-alpha-1", "team-alpha-2", "beta-team"):
        curl_proxy(stack, f"http://{ORIGIN_HOST}:{origin}/{user}", user)

    def logs(container: str) -> list[dict]:
        body = client.get(stack.url("/api/logs"), params={"container": container, "limit": 100}).json()
        assert body["total"] == len(body["items"])
        return body["items"]

    wait_for(lambda: len(logs("team")) == 3, 10, message="three log entries")
    assert {e["container_name"] for e in logs("alpha")} == {"team-alpha-1", "team-alpha-2"}
    # SQL LIKE, as for rules and pending: ASCII case does not matter.
    assert {e["container_name"] for e in logs("ALPHA")} == {"team-alpha-1", "team-alpha-2"}
    assert {e["container_name"] for e in logs("team-alpha-1")} == {"team-alpha-1"}  # the exact name still works
    assert logs("a_p") == [] and logs("%") == []  # LIKE metacharacters are literal
    for e in logs("team"):
        assert type(e["response_time_ms"]) is int and type(e["response_time_us"]) is int, e
        assert abs(e["response_time_us"] / 1000 - e["response_time_ms"]) <= 0.5

    def txs(container: str) -> list[dict]:
        return client.get(stack.url("/api/transactions"), params={"container": container}).json()["items"]

    wait_for(lambda: len(txs("team")) == 3, 10, message="three transactions")
    assert {t["container_name"] for t in txs("alpha")} == {"team-alpha-1", "team-alpha-2"}
    for t in txs("team"):
        assert type(t["duration_ms"]) is int and type(t["duration_us"]) is int, t
    detail = client.get(stack.url(f"/api/transactions/{txs('beta')[0]['id']}")).json()
    assert type(detail["duration_ms"]) is int


# ----------------------------------------------------------------------------- a second stack


def test_path_prefix_and_builtins_switched_off(origin: int) -> None:
    with Stack({"greyproxy": {"pathPrefix": "/gp", "builtinRules": False}, "proxy": {"holdTimeout": 1}}) as s:
        port = s.ports["api"]
        # Item 12: a bare /ws outside the prefix is an unknown path (404), like any other.
        with pytest.raises(InvalidStatus) as info, connect(f"ws://127.0.0.1:{port}/ws", open_timeout=5):
            pass
        assert info.value.response.status_code == 404
        assert orjson.loads(info.value.response.body) == {"error": "not found"}
        with connect(f"ws://127.0.0.1:{port}/gp/ws", open_timeout=5) as c:
            assert orjson.loads(c.recv(timeout=5))["type"] == "connected"
        # greyproxy.builtinRules: false: the loopback allows are not applied (held, then blocked).
        with plain_origin(HelloHandler) as local:
            t0 = time.monotonic()
            code, _ = curl_proxy(s, f"http://127.0.0.1:{local}/", "agent")
            assert code == "403"
            assert time.monotonic() - t0 >= 0.9  # it was held (no rule), not allowed
            pending = s.get("/api/pending").json()["items"]
            assert any(p["destination_host"] == "127.0.0.1" and p["destination_port"] == local for p in pending)
