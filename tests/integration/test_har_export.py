"""HAR export through the real stack (SPEC §14): a mixed capture (GET, POST JSON, SSE, a WebSocket
with messages) made through the HTTP forward proxy, exported by `GET /api/transactions/export.har`
and `greyproxy export --har FILE`, checked against the HAR 1.2 schema; and 100 000 stored
transactions exported with the API process's memory measured while it streams.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import orjson
import pytest

from conftest import PYTHON, REPO, JsonEchoHandler, Stack, plain_origin, proxy_url, wait_for, websocket_origin
from greyproxy.capture import TRANSACTION_COLUMNS
from greyproxy.har import HAR_SCHEMA

pytestmark = pytest.mark.stack

HOST = "127.0.0.1"  # the builtin loopback rule allows it for every identity
SECRET = "sk-har-" + "5d2b9c" * 4
SSE_EVENTS = 3
MARK = b'"startedDateTime"'  # once per entry


class _Origin(JsonEchoHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.startswith("/sse"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(SSE_EVENTS):
                data = f"data: event {i}\n\n".encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
                time.sleep(0.05)
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.reply(json.dumps({"path": self.path}).encode(), "application/json")


@pytest.fixture(scope="module")
def origin() -> Iterator[int]:
    with plain_origin(_Origin, HOST) as port:
        yield port


async def _echo(ws) -> None:  # noqa: ANN001
    async for msg in ws:
        await ws.send(msg)


@pytest.fixture(scope="module")
def ws_origin() -> Iterator[int]:
    with websocket_origin(_echo, HOST, ping_interval=None, compression=None) as port:
        yield port


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack({"proxy": {"holdTimeout": 2}}) as s:
        yield s


def _mixed_capture(stack: Stack, origin: int, ws_origin: int, container: str) -> None:
    from websockets.sync.client import connect

    proxy = proxy_url(stack, container, "x")
    with httpx.Client(proxy=proxy, timeout=10, trust_env=False) as c:
        assert (
            c.get(
                f"http://{HOST}:{origin}/get?q=1&r=two",
                headers={"Authorization": f"Bearer {SECRET}", "Cookie": "a=1; b=2"},
            ).status_code
            == 200
        )
        r = c.post(f"http://{HOST}:{origin}/post", json={"model": "m", "n": 1}, headers={"X-Api-Key": SECRET})
        assert r.json() == {"echo": {"model": "m", "n": 1}}
        with c.stream("GET", f"http://{HOST}:{origin}/sse") as s:
            assert b"".join(s.iter_bytes()).count(b"data: event") == SSE_EVENTS
    # ws:// through the proxy (the websockets client tunnels it with CONNECT; intercepted as plain HTTP).
    with connect(f"ws://{HOST}:{ws_origin}/chat", proxy=proxy, open_timeout=10) as ws:
        for text in ("hello", "world"):
            ws.send(text)
            assert ws.recv(timeout=10) == text


def _export(stack: Stack, **params: str) -> bytes:
    r = stack.get("/api/transactions/export.har", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    return r.content


def test_mixed_capture_exports_valid_har(stack: Stack, origin: int, ws_origin: int, tmp_path: Path) -> None:
    _mixed_capture(stack, origin, ws_origin, "har-agent")

    def complete() -> dict | None:
        doc = orjson.loads(_export(stack, container="har-agent"))
        methods = [e["request"]["method"] for e in doc["log"]["entries"]]
        return doc if methods.count("WS_REQ") == 2 and methods.count("WS_RESP") == 2 and len(methods) >= 7 else None

    doc = wait_for(complete, 15, message="the whole mixed capture in the export")
    jsonschema.Draft202012Validator(HAR_SCHEMA).validate(doc)
    entries = doc["log"]["entries"]
    assert [e["startedDateTime"] for e in entries] == sorted(e["startedDateTime"] for e in entries)
    by_path = {
        e["request"]["url"].split(str(origin), 1)[-1]: e
        for e in entries
        if e["request"]["method"] in ("GET", "POST") and e["response"]["status"] != 101
    }
    get = by_path["/get?q=1&r=two"]
    assert {"name": "q", "value": "1"} in get["request"]["queryString"]
    assert {"name": "Authorization", "value": "[REDACTED]"} in get["request"]["headers"]
    assert json.loads(get["response"]["content"]["text"]) == {"path": "/get?q=1&r=two"}
    post = by_path["/post"]
    assert post["request"]["postData"]["mimeType"] == "application/json"
    assert json.loads(post["request"]["postData"]["text"]) == {"model": "m", "n": 1}
    assert {"name": "X-Api-Key", "value": "[REDACTED]"} in post["request"]["headers"]
    sse = by_path["/sse"]
    assert sse["response"]["content"]["mimeType"] == "text/event-stream"
    assert sse["response"]["content"]["text"].count("data: event") == SSE_EVENTS
    upgrade = next(e for e in entries if e["response"]["status"] == 101)
    assert upgrade["_resourceType"] == "websocket" and upgrade["request"]["url"].endswith("/chat")
    sent = [e["_webSocketMessages"][0]["data"] for e in entries if e["request"]["method"] == "WS_REQ"]
    got = [e["_webSocketMessages"][0]["data"] for e in entries if e["request"]["method"] == "WS_RESP"]
    assert sent == ["hello", "world"] and got == ["hello", "world"]
    raw = _export(stack)
    assert SECRET.encode() not in raw
    assert {e["_container"] for e in orjson.loads(raw)["log"]["entries"]} >= {"har-agent"}

    # The CLI writes the same document to a file.
    out = tmp_path / "capture.har"
    subprocess.run(
        [PYTHON, "-m", "greyproxy", "export", "--har", str(out), "--container", "har-agent", "-C", str(stack.cfg_path)],
        env=stack.env,
        cwd=str(REPO),
        check=True,
        timeout=60,
        capture_output=True,
    )
    assert orjson.loads(out.read_bytes()) == orjson.loads(_export(stack, container="har-agent"))
    assert not (tmp_path / "capture.har.part").exists()


def test_export_route_filters_and_errors(stack: Stack) -> None:
    doc = orjson.loads(_export(stack, container="nobody-at-all"))
    assert doc["log"]["entries"] == [] and doc["log"]["version"] == "1.2"
    jsonschema.Draft202012Validator(HAR_SCHEMA).validate(doc)
    r = stack.get(
        "/api/transactions/export.har", params={"from_date": "2030-01-01T00:00:00Z", "to_date": "2020-01-01T00:00:00Z"}
    )
    assert r.status_code == 400 and "from_date" in r.json()["error"]
    # limit/offset as the list takes them: checked (they were ignored, `limit=abc` answered 200),
    # and applied to the matches in export order (oldest first)
    for bad in ({"limit": "abc"}, {"limit": "0"}, {"offset": "-1"}):
        r = stack.get("/api/transactions/export.har", params=bad)
        assert r.status_code == 400 and next(iter(bad)) in r.json()["error"], (bad, r.text)
    every = orjson.loads(_export(stack))["log"]["entries"]
    assert len(every) >= 2, "the module's earlier tests made transactions"
    page = orjson.loads(_export(stack, limit="1", offset="1"))["log"]["entries"]
    assert [e["_id"] for e in page] == [every[1]["_id"]]
    assert orjson.loads(_export(stack, offset=str(len(every))))["log"]["entries"] == []
    assert stack.get("/api/transactions/999999999").status_code == 404  # the id route is still there
    assert stack.get("/api/transactions/export.json").status_code == 400  # not an id (issue 13 item 10)
    p = subprocess.run(
        [PYTHON, "-m", "greyproxy", "export", "--har", "-", "--from", "garbage", "-C", str(stack.cfg_path)],
        env=stack.env,
        cwd=str(REPO),
        timeout=60,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 1 and "400" in p.stderr


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_100k_transactions_export_in_bounded_memory(stack: Stack) -> None:
    n = 100_000
    cols = [c for c in TRANSACTION_COLUMNS if c != "id"]
    body = json.dumps({"choices": [{"message": {"content": "x" * 400}}]})
    headers = json.dumps({"Content-Type": ["application/json"], "Authorization": ["[REDACTED]"]})
    t0 = time.time() - 3 * 3600  # recent: older rows are pruned past retention while the export runs

    def row(i: int) -> list:
        values = {
            "timestamp": t0 + i * 0.01,
            "container_name": "bulk",
            "destination_host": "api.test",
            "destination_port": 443,
            "method": "POST",
            "url": f"https://api.test/v1/chat?i={i}",
            "request_headers": headers,
            "request_body": body,
            "request_body_size": len(body),
            "request_content_type": "application/json",
            "status_code": 200,
            "response_headers": headers,
            "response_body": body,
            "response_body_size": len(body),
            "response_content_type": "application/json",
            "duration_ms": 12.5,
            "rule_id": None,
            "result": "allowed",
            "conversation_id": None,
            "substituted_credentials": "[]",
            "session_id": None,
        }
        return [values.get(c, 0 if c == "host_mismatch" else None) for c in cols]

    con = sqlite3.connect(stack.db_path, timeout=30)
    with con:
        con.executemany(
            f"INSERT INTO http_transactions ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            (row(i) for i in range(n)),
        )
    con.close()

    api_pid = stack.pid("api")
    assert api_pid
    before = _rss_kib(api_pid)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_kib(api_pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    count, size, tail = 0, 0, b""
    started = time.monotonic()
    try:
        with httpx.stream(
            "GET",
            stack.url("/api/transactions/export.har"),
            params={"container": "bulk"},
            timeout=httpx.Timeout(30, read=120),
            trust_env=False,
        ) as r:
            assert r.status_code == 200
            first = b""
            for chunk in r.iter_bytes():
                if len(first) < 200:
                    first += chunk[:200]
                size += len(chunk)
                data = tail + chunk
                count += data.count(MARK)
                tail = data[-(len(MARK) - 1) :]  # shorter than MARK: no match is counted twice
            ending = tail
    finally:
        done.set()
        sampler.join(5)
    elapsed = time.monotonic() - started
    growth_mib = (peak[0] - before) / 1024
    print(
        f"\nHAR export of {n} transactions: {size / 2**20:.0f} MiB in {elapsed:.1f} s; API RSS "
        f"{before / 1024:.0f} MiB before, peak {peak[0] / 1024:.0f} MiB (+{growth_mib:.1f} MiB)"
    )
    assert count == n
    assert first.startswith(b'{"log":{"version":"1.2"') and ending.endswith(b"]}}\n")
    assert growth_mib < 50, f"API RSS grew by {growth_mib:.1f} MiB while exporting"
