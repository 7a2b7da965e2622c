"""Credential substitution against the real stack (SPEC §12 "Acceptance" 1-9, 11-14; item 10 is
in test_credentials_key.py): sessions and global credentials over the REST API, placeholders
swapped on the wire by the proxy (curl and httpx through it, intercepting), refusals that say why,
and the value nowhere but at the origin.

Origins: HTTPS on 127.0.0.2, 127.0.0.3 and 127.0.0.4 (trustme certificates the proxy trusts
through `mitm.upstreamCaFile`; 127.0.0.4 is in `mitm.bypass`) and plain HTTP on 127.0.0.1. Each
answers with a JSON echo of what it received (path, headers, body) and echoes the Authorization
header back in `X-Echoed`, so a value that reached it is in the response the proxy records.
The stack runs at DEBUG. Tests run in file order (the last one, item 12, looks at everything the
module wrote, and makes its own substituted requests first so it cannot pass vacuously).
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import trustme
from websockets.sync.client import connect as ws_connect

from conftest import Stack, intercepting_stack, start_https_origin, wait_for

pytestmark = [
    pytest.mark.stack,
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required"),
]

PLAIN = "127.0.0.1"
BOUND = "127.0.0.2"  # where KEY may go
OTHER = "127.0.0.3"  # where it may not
BYPASS = "127.0.0.4"  # mitm.bypass: never intercepted
SID = "gw-7f3a"
# A unique value with characters whose percent-encoding differs from the raw text.
VALUE = f"sk-ant-{secrets.token_hex(12)}:v/a+l~ue"
GVALUE = f"gl-{secrets.token_hex(16)}-global/secret"
PH_RE = re.compile(r"greyproxy:credential:v1:([A-Za-z0-9._-]{1,128}):[0-9a-f]{32}")

RECEIVED: list[dict[str, Any]] = []  # what the origins received
ANSWERS: list[bytes] = []  # every API answer body of this module
EVENTS: list[str] = []  # every /ws message of this module


def mint(scope: str = SID) -> str:
    return f"greyproxy:credential:v1:{scope}:{secrets.token_hex(16)}"


def forms(value: str) -> list[str]:
    """What must never be stored: the value, its base64 (alone and as Basic x:value), its percent-encoding."""
    return [
        value,
        base64.b64encode(value.encode()).decode(),
        base64.b64encode(f"x:{value}".encode()).decode(),
        quote(value, safe=""),
    ]


def stream_parts(value: str) -> list[str]:
    """The text deltas of `_Echo`'s stream: the value cut into three parts, none of them the value."""
    return ["your key is ", value[:10], value[10:25], value[25:], " done"]


class _Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n).decode("utf-8", "replace") if n else ""
        host = self.server.server_address[0]  # type: ignore[attr-defined]
        got = {
            "origin": host,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body,
        }
        RECEIVED.append(got)
        if self.path.startswith("/stream"):  # an LLM-style answer streaming the X-Key it got back in deltas
            self._stream(self.headers.get("X-Key") or "")
            return
        out = json.dumps(got).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        if self.headers.get("Authorization"):
            self.send_header("X-Echoed", self.headers["Authorization"])
        if self.headers.get("X-Key"):  # an origin answering with the value's base64 (acceptance 12: never stored)
            self.send_header("X-Echoed-B64", base64.b64encode(self.headers["X-Key"].encode()).decode())
        self.end_headers()
        self.wfile.write(out)

    def _stream(self, key: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for text in stream_parts(key):
            delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
            event = f"event: content_block_delta\ndata: {json.dumps(delta)}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        self.wfile.write(b"0\r\n\r\n")

    do_GET = do_POST = _answer  # noqa: N815 - http.server's naming

    def log_message(self, *args: Any) -> None:
        pass


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def origin_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def origins(origin_ca: trustme.CA) -> Iterator[dict[str, int]]:
    servers = []
    ports: dict[str, int] = {}
    for host in (BOUND, OTHER, BYPASS):
        server, port = start_https_origin(origin_ca, host, _Echo)
        servers.append(server)
        ports[host] = port
    plain = http.server.ThreadingHTTPServer((PLAIN, 0), _Echo)
    plain.daemon_threads = True
    threading.Thread(target=plain.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    servers.append(plain)
    ports[PLAIN] = plain.server_address[1]
    yield ports
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture(scope="module")
def stack(origin_ca_file: Path, origins: dict[str, int]) -> Iterator[Stack]:
    with intercepting_stack(
        {"proxy": {"holdTimeout": 2}, "mitm": {"bypass": [BYPASS]}},
        origin_ca_file,
        allow=(BOUND, OTHER, BYPASS),
        env={"GREYPROXY_LOG_LEVEL": "DEBUG"},
    ) as s:
        yield s


@pytest.fixture(scope="module")
def ws_events(stack: Stack) -> Iterator[list[str]]:
    """Every /ws message while the module runs; `greyproxy events --json --type '*'` (every bus topic,
    internal ones included) writes to <root>/events.jsonl meanwhile."""
    listening, stop = threading.Event(), threading.Event()
    out = open(stack.root / "events.jsonl", "wb")  # noqa: SIM115 - closed below
    cli = subprocess.Popen(
        [sys.executable, "-m", "greyproxy", "events", "--json", "--type", "*", "-C", str(stack.cfg_path)],
        stdout=out,
        stderr=subprocess.DEVNULL,
        env=stack.env,
    )

    def watch() -> None:
        url = stack.api.replace("http://", "ws://", 1) + "/ws"
        while not stop.is_set():
            try:
                with ws_connect(url, open_timeout=5) as ws:
                    listening.set()
                    while not stop.is_set():
                        try:
                            EVENTS.append(str(ws.recv(timeout=0.2)))
                        except TimeoutError:
                            continue
            except Exception:  # noqa: BLE001 - the API restarts in item 9: connect again
                time.sleep(0.2)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    assert listening.wait(10)
    time.sleep(0.3)  # the bridge subscribes to the per-request topics once a client is there
    yield EVENTS
    stop.set()
    t.join(5)
    cli.terminate()
    cli.wait(5)
    out.close()


@pytest.fixture(scope="module")
def world(stack: Stack, ws_events: list[str]) -> dict[str, Any]:
    """One global credential (unbound) and one session: KEY bound to 127.0.0.1 and 127.0.0.2, plus the global."""
    g = api(stack, "POST", "/api/credentials", json={"label": "GLOBAL_TOKEN", "value": GVALUE})
    assert g.status_code == 200, g.text
    ph = mint()
    r = api(
        stack,
        "POST",
        "/api/sessions",
        json={
            "session_id": SID,
            "container_name": "claude",
            "mappings": {ph: VALUE},
            "labels": {ph: "KEY"},
            "hosts": {ph: [PLAIN, BOUND]},
            "metadata": {"cwd": "/home/me/proj"},
            "global_credentials": ["GLOBAL_TOKEN"],
        },
    )
    assert r.status_code == 200, r.text
    return {"ph": ph, "global": g.json(), "session": r.json(), "created": time.time()}


# ---------------------------------------------------------------- helpers


def api(stack: Stack, method: str, path: str, **kw: Any) -> httpx.Response:
    r = stack.request(method, path, **kw)
    ANSWERS.append(r.content)
    return r


def curl(stack: Stack, container: str, url: str, *args: str, timeout: int = 20) -> tuple[int, dict[str, str], bytes]:
    """(status, response headers, body) of a request through the HTTP proxy (tunnelled for https)."""
    proxy = f"http://{container}:x@127.0.0.1:{stack.ports['http-proxy']}"
    extra = ["-p", "--cacert", str(stack.data_dir / "ca-cert.pem")] if url.startswith("https") else []
    p = subprocess.run(
        [
            "curl",
            "-s",
            "-S",
            "-i",
            "--suppress-connect-headers",
            "--max-time",
            str(timeout),
            "-x",
            proxy,
            *extra,
            *args,
            url,
        ],
        capture_output=True,
        timeout=timeout + 5,
    )
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    head, _, body = p.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


def txns(stack: Stack, container: str, n: int = 1) -> list[dict[str, Any]]:
    def got() -> list[dict[str, Any]] | None:
        r = api(stack, "GET", "/api/transactions", params={"container": container, "limit": 100})
        items = r.json()["items"]
        return items if len(items) >= n else None

    return sorted(wait_for(got, 10, message=f"{n} transaction(s) of {container}"), key=lambda t: t["id"])


def received(path_part: str) -> list[dict[str, Any]]:
    return [r for r in RECEIVED if path_part in r["path"]]


def refused(status: int, headers: dict[str, str], body: bytes, reason: str) -> str:
    assert status == 403 and headers.get("x-greyproxy-reason") == reason, (status, headers, body)
    assert headers.get("content-type") == "text/plain; charset=utf-8"
    text = body.decode()
    assert text.count("\n") <= 1 and text.startswith("Greyproxy: "), text
    return text


def session(stack: Stack, **body: Any) -> httpx.Response:
    body.setdefault("container_name", "claude")
    return api(stack, "POST", "/api/sessions", json=body)


def wait_event(type_: str, pred: Any, timeout: float = 10) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        for e in list(EVENTS):
            m = json.loads(e)
            if m.get("type") == type_ and pred(m.get("data")):
                return m
        return None

    return wait_for(find, timeout, message=f"a {type_} event on /ws")


# ---------------------------------------------------------------- 1. sessions


def test_1_session_created_and_listed(stack: Stack, world: dict[str, Any]) -> None:
    s = world["session"]
    assert s["session_id"] == SID and s["ttl_seconds"] == 900 and s["credential_count"] == 2
    expires = time.mktime(time.strptime(s["expires_at"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert abs(expires - (world["created"] + 900)) < 5
    gph = s["global_credentials"]["GLOBAL_TOKEN"]
    assert PH_RE.fullmatch(gph) and PH_RE.fullmatch(gph).group(1) == "global"  # type: ignore[union-attr]
    r = api(stack, "GET", "/api/sessions")
    assert r.status_code == 200 and isinstance(r.json(), list)
    (mine,) = [x for x in r.json() if x["session_id"] == SID]
    assert mine["credential_labels"] == ["KEY", "GLOBAL_TOKEN"] and mine["credential_count"] == 2
    assert mine["credentials"] == [
        {"label": "KEY", "scope": "session", "hosts": [PLAIN, BOUND]},
        {"label": "GLOBAL_TOKEN", "scope": "global", "hosts": []},
    ]
    assert mine["metadata"] == {"cwd": "/home/me/proj"} and mine["container_name"] == "claude"
    assert "greyproxy:credential:" not in r.text and VALUE not in r.text and GVALUE not in r.text
    wait_event("session.created", lambda d: d == SID)


# ---------------------------------------------------------------- 2. substitution


def test_2_headers_query_and_basic_are_substituted(
    stack: Stack, world: dict[str, Any], origins: dict[str, int]
) -> None:
    ph = world["ph"]
    url = f"https://{BOUND}:{origins[BOUND]}/two?a=1&key={ph.replace(':', '%3A')}&b=%7E"
    status, headers, body = curl(
        stack, "agent-2", url, "-H", f"Authorization: Bearer {ph}", "-H", f"X-Key: pre-{ph}-post"
    )
    assert status == 200, body
    (got,) = received("/two?")
    assert got["headers"]["authorization"] == f"Bearer {VALUE}" and got["headers"]["x-key"] == f"pre-{VALUE}-post"
    assert got["path"] == f"/two?a=1&key={quote(VALUE, safe='')}&b=%7E"  # a=1 and b=%7E byte-identical
    assert headers["x-echoed"] == f"Bearer {VALUE}"  # the client gets the response unmodified
    (t,) = txns(stack, "agent-2")
    assert t["substituted_credentials"] == ["KEY"] and t["session_id"] == SID and t["result"] == "allowed"
    assert ph.replace(":", "%3A") in t["url"] and t["request_headers"]["X-Key"] == [f"pre-{ph}-post"]
    detail = api(stack, "GET", f"/api/transactions/{t['id']}").json()
    assert "[REDACTED:KEY]" in detail["response_body"] and VALUE not in json.dumps(detail)
    assert detail["response_headers"]["X-Echoed"] == ["Bearer [REDACTED:KEY]"]

    basic = base64.b64encode(f"x:{ph}".encode()).decode()
    status, _h, body = curl(
        stack, "agent-2b", f"https://{BOUND}:{origins[BOUND]}/two-basic", "-H", f"Authorization: Basic {basic}"
    )
    assert status == 200, body
    (got,) = received("/two-basic")
    assert got["headers"]["authorization"] == "Basic " + base64.b64encode(f"x:{VALUE}".encode()).decode()
    (t,) = txns(stack, "agent-2b")
    assert t["substituted_credentials"] == ["KEY"]

    # Over a plain http:// forward request (KEY is bound to 127.0.0.1): httpx this time.
    with httpx.Client(
        proxy=f"http://agent-2f:x@127.0.0.1:{stack.ports['http-proxy']}", trust_env=False, timeout=10
    ) as c:
        r = c.get(f"http://{PLAIN}:{origins[PLAIN]}/two-plain?key={ph}", headers={"X-Key": ph})
    assert r.status_code == 200, r.text
    (got,) = received("/two-plain")
    assert got["headers"]["x-key"] == VALUE and got["path"] == f"/two-plain?key={quote(VALUE, safe='')}"
    (t,) = txns(stack, "agent-2f")
    assert t["substituted_credentials"] == ["KEY"] and t["session_id"] == SID


def test_2_an_unbound_global_is_refused_over_plain_http(
    stack: Stack, world: dict[str, Any], origins: dict[str, int]
) -> None:
    gph = world["session"]["global_credentials"]["GLOBAL_TOKEN"]
    text = refused(
        *curl(stack, "agent-2p", f"http://{PLAIN}:{origins[PLAIN]}/two-clear", "-H", f"X-G: {gph}"),
        "plaintext_credential",
    )
    assert "GLOBAL_TOKEN" in text and not received("/two-clear")
    # Plain HTTP inside a CONNECT tunnel goes upstream in clear as well: refused the same way.
    sock = socket.create_connection(("127.0.0.1", stack.ports["http-proxy"]), timeout=10)
    with sock:
        auth = base64.b64encode(b"agent-2t:x").decode()
        sock.sendall(
            f"CONNECT {PLAIN}:{origins[PLAIN]} HTTP/1.1\r\nHost: {PLAIN}:{origins[PLAIN]}\r\n"
            f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode()
        )
        resp = http.client.HTTPResponse(sock)  # type: ignore[arg-type]
        resp.begin()
        assert resp.status == 200
        sock.sendall(f"GET /two-tunnel HTTP/1.1\r\nHost: {PLAIN}\r\nX-G: {gph}\r\n\r\n".encode())
        resp = http.client.HTTPResponse(sock)  # type: ignore[arg-type]
        resp.begin()
        assert resp.status == 403 and resp.getheader("X-Greyproxy-Reason") == "plaintext_credential"
    assert not received("/two-tunnel")
    # ...and substituted over intercepted HTTPS, with no session recorded (a global only).
    status, _h, _b = curl(stack, "agent-2g", f"https://{OTHER}:{origins[OTHER]}/two-global", "-H", f"X-G: {gph}")
    assert status == 200 and received("/two-global")[0]["headers"]["x-g"] == GVALUE
    (t,) = txns(stack, "agent-2g")
    assert t["substituted_credentials"] == ["GLOBAL_TOKEN"] and t["session_id"] is None


# ---------------------------------------------------------------- 3. fail loudly


def test_3_unknown_malformed_deleted_in_path_and_body(
    stack: Stack, world: dict[str, Any], origins: dict[str, int]
) -> None:
    base = f"https://{BOUND}:{origins[BOUND]}"
    gone = mint("gw-gone")
    r = session(stack, session_id="gw-gone", mappings={gone: "short-lived-value-1"})
    assert r.status_code == 200
    assert api(stack, "DELETE", "/api/sessions/gw-gone").json() == {"session_id": "gw-gone", "deleted": True}
    cases = [
        ("unknown-h", ["-H", f"X-Api-Key: {mint()}"], "header X-Api-Key"),
        ("malformed-h", ["-H", f"X-Api-Key: {SID}-greyproxy:credential:v1:{SID}:zz"], "header X-Api-Key"),
        ("deleted-h", ["-H", f"X-Api-Key: {gone}"], "header X-Api-Key"),
        (f"unknown-q?key={mint().replace(':', '%3A')}", [], "query parameter key"),
        ("malformed-q?key=greyproxy:credential:v1:gw-7f3a:zz", [], "query parameter key"),
    ]
    for i, (path, args, where) in enumerate(cases):
        container = f"agent-3-{i}"
        text = refused(*curl(stack, container, f"{base}/{path}", *args), "unknown_placeholder")
        assert where in text, text
        assert not received(path.split("?")[0]), path  # nothing reached the origin
        (t,) = txns(stack, container)
        assert t["result"] == "blocked" and t["status_code"] == 403 and t["block_reason"] == "unknown_placeholder"
        assert t["substituted_credentials"] == [] and t["refused_credentials"] == []
    text = refused(*curl(stack, "agent-3-path", f"{base}/x/{world['ph']}/y"), "placeholder_in_path")
    assert "KEY" in text and not received("/x/")
    (t,) = txns(stack, "agent-3-path")
    assert t["block_reason"] == "placeholder_in_path" and t["refused_credentials"] == ["KEY"]
    # Only in the body: sent unchanged.
    status, _h, _b = curl(
        stack, "agent-3-body", f"{base}/body-only", "-d", f"quote {world['ph']} here", "-H", "Content-Type: text/plain"
    )
    assert status == 200 and received("/body-only")[0]["body"] == f"quote {world['ph']} here"


# ---------------------------------------------------------------- 4. host binding


def test_4_a_bound_credential_goes_only_where_it_may(
    stack: Stack, world: dict[str, Any], origins: dict[str, int]
) -> None:
    ph = world["ph"]
    text = refused(
        *curl(stack, "agent-4a", f"https://{OTHER}:{origins[OTHER]}/four", "-H", f"X-Key: {ph}"),
        "credential_host_mismatch",
    )
    assert "KEY" in text and BOUND in text and OTHER in text, text
    # Inside a tunnel to 127.0.0.3, a Host header naming the bound host.
    status, headers, body = curl(
        stack,
        "agent-4b",
        f"https://{OTHER}:{origins[OTHER]}/four-host",
        "-H",
        f"X-Key: {ph}",
        "-H",
        f"Host: {BOUND}:{origins[BOUND]}",
        "-k",
    )
    refused(status, headers, body, "credential_host_mismatch")
    assert not received("/four")
    (t,) = txns(stack, "agent-4a")
    assert t["block_reason"] == "credential_host_mismatch" and t["refused_credentials"] == ["KEY"]
    ev = wait_event("credential.refused", lambda d: d.get("transaction_id") == t["id"])["data"]
    assert ev == {
        "transaction_id": t["id"],
        "container_name": "agent-4a",
        "destination_host": OTHER,
        "reason": "credential_host_mismatch",
        "labels": ["KEY"],
        "session_id": SID,
    }
    # ...and on the bus (`greyproxy events --json`, started by the ws_events fixture).
    wait_for(
        lambda: f'"transaction_id":{t["id"]}' in (stack.root / "events.jsonl").read_text(),
        5,
        message="credential.refused from greyproxy events",
    )
    # The proxy said it in its log (container, destination, reason, labels, session).
    wait_for(
        lambda: "credential refused: agent-4a" in (stack.data_dir / "logs" / "proxy.log").read_text(),
        5,
        message="the refusal in proxy.log",
    )


# ---------------------------------------------------------------- 5. ttl


def test_5_ttl_is_exact(stack: Stack, world: dict[str, Any], origins: dict[str, int]) -> None:
    ph = mint("gw-ttl")
    r = session(stack, session_id="gw-ttl", mappings={ph: "ttl-value-0123"}, ttl_seconds=2)
    assert r.status_code == 200 and r.json()["ttl_seconds"] == 2
    created = time.time()
    assert curl(stack, "agent-5", f"https://{BOUND}:{origins[BOUND]}/ttl-live", "-H", f"X: {ph}")[0] == 200
    time.sleep(max(0.0, created + 2.5 - time.time()))
    refused(
        *curl(stack, "agent-5", f"https://{BOUND}:{origins[BOUND]}/ttl-dead", "-H", f"X: {ph}"), "unknown_placeholder"
    )
    hb = api(stack, "POST", "/api/sessions/gw-ttl/heartbeat")
    assert hb.status_code == 404 and hb.json() == {"error": "session not found or expired"}
    # Capped at 3600; a heartbeat on a live session moves expires_at.
    r = session(stack, session_id="gw-long", mappings={mint("gw-long"): "long-value-0123"}, ttl_seconds=99999)
    assert r.json()["ttl_seconds"] == 3600
    exp = time.mktime(time.strptime(r.json()["expires_at"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert abs(exp - (time.time() + 3600)) < 5
    time.sleep(1.1)
    hb = api(stack, "POST", "/api/sessions/gw-long/heartbeat")
    assert hb.status_code == 200 and hb.json()["expires_at"] > r.json()["expires_at"]
    wait_event("session.heartbeat", lambda d: d == "gw-long")
    # Swept within 15 s of expiry, with session.expired; GET no longer lists it.
    wait_event("session.expired", lambda d: d == "gw-ttl", timeout=15)
    assert "gw-ttl" not in [x["session_id"] for x in api(stack, "GET", "/api/sessions").json()]


# ---------------------------------------------------------------- 6. synchronous


def test_6_created_substitutes_at_once_deleted_refused_at_once(stack: Stack, origins: dict[str, int]) -> None:
    for i in range(3):
        sid = f"gw-sync-{i}"
        ph = mint(sid)
        assert session(stack, session_id=sid, mappings={ph: f"sync-value-{i}-abcdef"}).status_code == 200
        status, _h, body = curl(stack, "agent-6", f"https://{BOUND}:{origins[BOUND]}/sync-{i}", "-H", f"X: {ph}")
        assert status == 200, body
        assert received(f"/sync-{i}")[0]["headers"]["x"] == f"sync-value-{i}-abcdef"
        assert api(stack, "DELETE", f"/api/sessions/{sid}").json()["deleted"] is True
        refused(
            *curl(stack, "agent-6", f"https://{BOUND}:{origins[BOUND]}/sync-gone-{i}", "-H", f"X: {ph}"),
            "unknown_placeholder",
        )
        assert api(stack, "DELETE", f"/api/sessions/{sid}").json() == {"session_id": sid, "deleted": False}
    wait_event("session.deleted", lambda d: d == "gw-sync-0")


# ---------------------------------------------------------------- 7. globals


def test_7_global_credentials(stack: Stack, origins: dict[str, int]) -> None:
    v51 = "sk-ant" + "m" * 42 + "xyz"
    r = api(stack, "POST", "/api/credentials", json={"label": "PREVIEW_51", "value": v51, "hosts": [BOUND]})
    assert r.status_code == 200, r.text
    item = r.json()
    assert item["value_preview"] == "sk-ant***xyz" and re.fullmatch(r"cred_[0-9a-f]{16}", item["id"])
    assert PH_RE.fullmatch(item["placeholder"]).group(1) == "global"  # type: ignore[union-attr]
    assert item["hosts"] == [BOUND] and item["substitution_count"] == 0 and item["last_used_at"] is None
    wait_event("credential.created", lambda d: d.get("id") == item["id"])
    assert (
        api(stack, "POST", "/api/credentials", json={"label": "PREVIEW_20", "value": "abcdefghijklmnopqrst"}).json()[
            "value_preview"
        ]
        == "abc***"
    )
    assert (
        api(stack, "POST", "/api/credentials", json={"label": "PREVIEW_8", "value": "abcdefgh"}).json()["value_preview"]
        == "***"
    )
    taken = api(stack, "POST", "/api/credentials", json={"label": "PREVIEW_51", "value": "other-value-123"})
    assert taken.status_code == 409 and taken.json() == {"error": "a credential labelled PREVIEW_51 already exists"}
    listed = api(stack, "GET", "/api/credentials").json()
    assert [c["label"] for c in listed][:3] == ["PREVIEW_8", "PREVIEW_20", "PREVIEW_51"]
    # A session that referenced it ends: the global placeholder still substitutes.
    r = session(stack, session_id="gw-ref", global_credentials=["PREVIEW_51"])
    assert r.status_code == 200 and r.json()["global_credentials"] == {"PREVIEW_51": item["placeholder"]}
    assert api(stack, "DELETE", "/api/sessions/gw-ref").json()["deleted"] is True
    status, _h, _b = curl(
        stack, "agent-7", f"https://{BOUND}:{origins[BOUND]}/g-still", "-H", f"X: {item['placeholder']}"
    )
    assert status == 200 and received("/g-still")[0]["headers"]["x"] == v51
    # Deleted: refused at once; an unknown id is 404.
    assert api(stack, "DELETE", f"/api/credentials/{item['id']}").json() == {"id": item["id"], "deleted": True}
    wait_event("credential.deleted", lambda d: d == {"id": item["id"], "label": "PREVIEW_51"})
    refused(
        *curl(stack, "agent-7", f"https://{BOUND}:{origins[BOUND]}/g-gone", "-H", f"X: {item['placeholder']}"),
        "unknown_placeholder",
    )
    nf = api(stack, "DELETE", f"/api/credentials/{item['id']}")
    assert nf.status_code == 404 and nf.json() == {"error": "credential not found"}


# ---------------------------------------------------------------- 8. 400s


def test_8_bad_input_is_a_400_that_never_echoes_the_value(stack: Stack, world: dict[str, Any]) -> None:
    secret = f"never-echo-{secrets.token_hex(8)}"
    ph = mint("gw-bad")
    bad = [
        ({"session_id": "gw-bad", "mappings": {ph: secret + "\r\nX-Injected: 1"}}, "control character"),
        ({"session_id": "gw-bad", "mappings": {ph: secret + "greyproxy:credential:v1:a:" + "0" * 32}}, "placeholder"),
        ({"session_id": "gw-bad", "mappings": {"not-a-placeholder": secret}}, "not a placeholder"),
        ({"session_id": "gw-bad", "mappings": {mint("global"): secret}}, "global"),
        ({"session_id": "bad id!", "mappings": {ph: secret}}, "session_id"),
        ({"session_id": "global", "mappings": {ph: secret}}, "session_id"),
        (
            {"session_id": "gw-bad", "global_credentials": ["NOPE_A", "NOPE_B"]},
            "unknown global credentials: NOPE_A, NOPE_B",
        ),
        ({"session_id": "gw-bad"}, "at least one of mappings, global_credentials"),
        ({"session_id": "gw-bad", "mappings": {ph: secret}, "hosts": {ph: ["10.0.0.0/99"]}}, "hosts"),
        ({"session_id": "gw-bad", "mappings": {ph: secret}, "ttl_seconds": "60"}, "ttl_seconds"),
        # A misspelt `hosts` would leave the value bound to no host: refused, not ignored.
        ({"session_id": "gw-bad", "mappings": {ph: secret}, "host": {ph: ["a.example"]}}, "did you mean 'hosts'"),
        ({"session_id": "gw-bad", "mapping": {ph: secret}}, "did you mean 'mappings'"),
    ]
    for body, words in bad:
        r = session(stack, **body)
        assert r.status_code == 400 and words in r.json()["error"], (body, r.text)
        assert secret not in r.text, r.text
    r = api(stack, "POST", "/api/credentials", json={"label": "BAD", "value": secret + "\n"})
    assert r.status_code == 400 and secret not in r.text
    assert api(stack, "POST", "/api/credentials", json={"label": "", "value": secret}).status_code == 400
    r = api(stack, "POST", "/api/credentials", json={"label": "BOUND", "value": secret, "host": ["a.example"]})
    assert r.status_code == 400 and "did you mean 'hosts'" in r.json()["error"] and secret not in r.text
    assert all(c["label"] != "BOUND" for c in api(stack, "GET", "/api/credentials").json())
    # A placeholder held by another live session: 409.
    r = session(stack, session_id="gw-thief", mappings={world["ph"]: "stolen-value-123"})
    assert r.status_code == 409 and SID in r.json()["error"], r.text


# ---------------------------------------------------------------- 9. the proxy killed


def test_9_placeholders_substitute_again_after_the_proxy_is_killed(
    stack: Stack, world: dict[str, Any], origins: dict[str, int]
) -> None:
    old = stack.pid("proxy")
    assert old
    os.kill(old, signal.SIGKILL)
    wait_for(
        lambda: (stack.pid("proxy") or old) != old and stack.health()[0] == 200, 30, interval=0.2, message="a new proxy"
    )
    gph = world["session"]["global_credentials"]["GLOBAL_TOKEN"]

    def through() -> bool:
        try:
            return (
                curl(
                    stack,
                    "agent-9",
                    f"https://{BOUND}:{origins[BOUND]}/after-kill",
                    "-H",
                    f"X-Key: {world['ph']}",
                    "-H",
                    f"X-G: {gph}",
                )[0]
                == 200
            )
        except AssertionError:
            return False

    wait_for(through, 15, interval=0.3, message="a request through the restarted proxy")
    got = received("/after-kill")[-1]["headers"]
    assert got["x-key"] == VALUE and got["x-g"] == GVALUE


# ---------------------------------------------------------------- 11. counters


def test_11_counters(stack: Stack, origins: dict[str, int]) -> None:
    ph = mint("gw-count")
    assert session(stack, session_id="gw-count", mappings={ph: "count-value-0123"}).status_code == 200
    for i in range(3):
        # two occurrences per request: still one use per request
        assert curl(stack, "agent-11", f"https://{BOUND}:{origins[BOUND]}/count-{i}?k={ph}", "-H", f"X: {ph}")[0] == 200

    def counted() -> bool:
        (s,) = [x for x in api(stack, "GET", "/api/sessions").json() if x["session_id"] == "gw-count"]
        return s["substitution_count"] == 3

    wait_for(counted, 5, interval=0.2, message="substitution_count 3")
    wait_event("session.substitution", lambda d: d == "gw-count", timeout=5)


# ---------------------------------------------------------------- 13, 14


def test_13_no_placeholder_no_change(stack: Stack, origins: dict[str, int]) -> None:
    status, _h, _b = curl(
        stack, "agent-13", f"https://{BOUND}:{origins[BOUND]}/plain?a=%7e&b=greyproxy", "-H", "X-Thing: greyproxy:cred"
    )
    assert status == 200
    got = received("/plain?")[0]
    assert got["path"] == "/plain?a=%7e&b=greyproxy" and got["headers"]["x-thing"] == "greyproxy:cred"
    (t,) = txns(stack, "agent-13")
    assert t["substituted_credentials"] == [] and t["block_reason"] is None


def test_14_a_bypassed_host_gets_the_placeholder_unchanged(
    stack: Stack, world: dict[str, Any], origins: dict[str, int]
) -> None:
    # Not intercepted: the client talks TLS with the origin itself (it trusts the origin's CA).
    proxy = f"http://agent-14:x@127.0.0.1:{stack.ports['http-proxy']}"
    ca = Path(stack.root) / "origin-ca-14.pem"
    ORIGIN_CA[0].cert_pem.write_to_path(str(ca))
    p = subprocess.run(
        [
            "curl",
            "-s",
            "-S",
            "--max-time",
            "20",
            "-p",
            "-x",
            proxy,
            "--cacert",
            str(ca),
            "-H",
            f"X-Key: {world['ph']}",
            f"https://{BYPASS}:{origins[BYPASS]}/bypassed",
        ],
        capture_output=True,
        timeout=25,
    )
    assert p.returncode == 0, p.stderr
    assert received("/bypassed")[0]["headers"]["x-key"] == world["ph"]


ORIGIN_CA: list[trustme.CA] = []


@pytest.fixture(scope="module", autouse=True)
def _keep_ca(origin_ca: trustme.CA) -> None:
    ORIGIN_CA[:] = [origin_ca]


# ---------------------------------------------------------------- 12. no value anywhere


def _everything_written(stack: Stack) -> dict[str, bytes]:
    files = {"serve.log": stack.serve_log}
    files.update({f"logs/{p.name}": p for p in (stack.data_dir / "logs").glob("**/*")})
    for p in stack.data_dir.rglob("*"):
        files[str(p.relative_to(stack.data_dir))] = p
    for suffix in ("", "-wal", "-shm"):
        files[f"db{suffix}"] = Path(f"{stack.db_path}{suffix}")
    return {name: p.read_bytes() for name, p in files.items() if p.is_file()}


def test_12_no_value_anywhere(stack: Stack, world: dict[str, Any], origins: dict[str, int]) -> None:
    ph = world["ph"]
    gph = world["session"]["global_credentials"]["GLOBAL_TOKEN"]
    basic = base64.b64encode(f"x:{ph}".encode()).decode()
    # This test's own substituted requests (so it cannot pass without a value having gone through).
    status, _h, _b = curl(
        stack,
        "agent-12",
        f"https://{BOUND}:{origins[BOUND]}/twelve?key={ph}",
        "-H",
        f"Authorization: Basic {basic}",
        "-H",
        f"X-Key: {ph}",
        "-H",
        f"X-G: {gph}",
    )
    assert status == 200
    got = received("/twelve")[0]
    assert got["headers"]["x-key"] == VALUE and got["headers"]["x-g"] == GVALUE
    # An origin streaming the value back in token deltas (each part alone is not the value; the
    # conversation assembler would join them): no part is stored either.
    status, _h, body = curl(stack, "agent-12", f"https://{BOUND}:{origins[BOUND]}/stream", "-H", f"X-Key: {ph}")
    assert status == 200 and all(part.encode() in body for part in stream_parts(VALUE)), body  # the wire: as sent
    stream_txn = next(t for t in txns(stack, "agent-12", 2) if t["url"].endswith("/stream"))
    stored = api(stack, "GET", f"/api/transactions/{stream_txn['id']}").json()["response_body"]
    texts = [json.loads(ln[6:])["delta"]["text"] for ln in stored.split("\n") if ln.startswith("data: ")]
    assert texts == ["your key is ", "[REDACTED:KEY]", "", "", " done"], stored  # what a joined read gets
    wait_for(lambda: any("agent-12" in e for e in EVENTS), 10, message="agent-12's transaction on /ws")
    # Every API answer there is.
    for path, params in (
        ("/api/sessions", None),
        ("/api/credentials", None),
        ("/api/health", None),
        ("/api/maintenance/status", None),
        ("/api/openapi.json", None),
        ("/api/logs", {"limit": 1000}),
        ("/api/transactions", {"limit": 1000, "include_bodies": "true"}),
    ):
        api(stack, "GET", path, params=params)
    for t in api(stack, "GET", "/api/transactions", params={"limit": 1000}).json()["items"]:
        api(stack, "GET", f"/api/transactions/{t['id']}")
    time.sleep(2.5)  # the counters' flush and the recorder's batch: everything written by now
    written = _everything_written(stack)
    assert "db-wal" in written and any(n.startswith("logs/") for n in written)
    cli_events = (stack.root / "events.jsonl").read_bytes()  # `greyproxy events --json` (every topic)
    assert b"session.created" in cli_events and b"service.heartbeat" in cli_events
    written["greyproxy events --json"] = cli_events
    for value in (VALUE, GVALUE):
        for form in [*forms(value), *stream_parts(value)[1:4]]:
            needle = form.encode()
            assert not [n for n, data in written.items() if needle in data], form
            assert not [e for e in EVENTS if form in e], form
            assert not [a for a in ANSWERS if needle in a], form
