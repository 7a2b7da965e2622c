"""Credential substitution with proxy.workers: 2 (SPEC §12.6 with §15): the API's reload reaches
every worker, so right after `POST /api/sessions` a request substitutes whichever worker takes
it, and right after `DELETE` it is refused by both; each worker counts its own substitutions and
the recorder adds them up."""

from __future__ import annotations

import http.server
import secrets
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import Stack, free_port, wait_for

pytestmark = [pytest.mark.stack, pytest.mark.timeout(180)]

ORIGIN = "127.0.0.1"
SEEN: list[dict[str, str]] = []


class _Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        SEEN.append({"path": self.path, "x-key": self.headers.get("X-Key", "")})
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def origin() -> Iterator[int]:
    port = free_port()
    server = http.server.ThreadingHTTPServer((ORIGIN, port), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield port
    server.shutdown()
    server.server_close()


def _get(stack: Stack, url: str, header: str) -> tuple[str, str]:
    """(status, X-Greyproxy-Reason) of one request on a new connection (the kernel picks the worker)."""
    p = subprocess.run(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-D",
            "-",
            "--max-time",
            "10",
            "-x",
            f"http://wk@127.0.0.1:{stack.ports['http-proxy']}",
            "-H",
            header,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    lines = p.stdout.splitlines()  # text mode: CRLF already turned into newlines
    reason = next((ln.split(":", 1)[1].strip() for ln in lines if ln.lower().startswith("x-greyproxy-reason")), "")
    return lines[0].split(" ")[1] if lines and " " in lines[0] else p.stderr, reason


def test_every_worker_substitutes_at_once_and_refuses_at_once(origin: int) -> None:
    with Stack({"proxy": {"workers": 2}}) as s:
        for round_ in range(2):
            sid = f"gw-w{round_}"
            ph = f"greyproxy:credential:v1:{sid}:{secrets.token_hex(16)}"
            value = f"worker-value-{secrets.token_hex(8)}"
            r = s.request(
                "POST",
                "/api/sessions",
                json={
                    "session_id": sid,
                    "container_name": "wk",
                    "mappings": {ph: value},
                    "labels": {ph: "WK"},
                    "hosts": {ph: [ORIGIN]},
                },
            )
            assert r.status_code == 200, r.text
            for i in range(12):  # no sleep: the answer means every worker has it
                assert _get(s, f"http://{ORIGIN}:{origin}/w{round_}-{i}", f"X-Key: {ph}") == ("200", "")
            got = [x["x-key"] for x in SEEN if x["path"].startswith(f"/w{round_}-")]
            assert got == [value] * 12
            assert s.request("DELETE", f"/api/sessions/{sid}").json()["deleted"] is True
            for i in range(12):
                assert _get(s, f"http://{ORIGIN}:{origin}/gone{round_}-{i}", f"X-Key: {ph}") == (
                    "403",
                    "unknown_placeholder",
                )
        assert not [x for x in SEEN if x["path"].startswith("/gone")]
        # Counted by both workers, added up by the recorder (one use per request).
        sid = "gw-count"
        ph = f"greyproxy:credential:v1:{sid}:{secrets.token_hex(16)}"
        assert (
            s.request(
                "POST",
                "/api/sessions",
                json={
                    "session_id": sid,
                    "container_name": "wk",
                    "mappings": {ph: "count-value-123"},
                    "hosts": {ph: [ORIGIN]},
                },
            ).status_code
            == 200
        )
        for i in range(10):
            assert _get(s, f"http://{ORIGIN}:{origin}/c{i}", f"X-Key: {ph}")[0] == "200"

        def counted() -> bool:
            (row,) = [x for x in s.get("/api/sessions").json() if x["session_id"] == sid]
            return row["substitution_count"] == 10

        wait_for(counted, 10, interval=0.2, message="substitution_count 10 over both workers")
