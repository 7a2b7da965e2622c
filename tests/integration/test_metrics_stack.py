"""GET /metrics through the real stack: Prometheus text that prometheus_client parses, every
process up, and counters that move with traffic through the proxy."""

from __future__ import annotations

import http.server
import shutil
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Stack, wait_for

pytestmark = [pytest.mark.stack, pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required")]


class _Origin(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = b"x" * 5000
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def origin() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Origin)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _scrape(stack: Stack) -> dict[tuple[str, tuple], float]:
    r = stack.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_parse_and_move_with_traffic(make_stack, origin: int) -> None:
    stack = make_stack(proxy={"holdTimeout": 1})
    before = wait_for(
        lambda: (m := _scrape(stack)) and ("greyproxy_proxy_connections_total", (("result", "allowed"),)) in m and m,
        10,
        message="the proxy's figures in /metrics",
    )
    for svc in ("proxy", "recorder", "maintenance", "bus", "api"):
        assert before[("greyproxy_up", (("service", svc),))] == 1.0, svc
    head = stack.request("HEAD", "/metrics")  # a probe's HEAD: what GET answers, without the body (was 405)
    assert head.status_code == 200 and head.headers["content-type"].startswith("text/plain") and head.content == b""

    proxy = f"http://metrics-agent:x@127.0.0.1:{stack.ports['http-proxy']}"
    for _ in range(3):
        p = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-x", proxy, f"http://127.0.0.1:{origin}/m"],
            capture_output=True,
            timeout=20,
        )
        assert p.returncode == 0, p.stderr
    # An unknown destination: held for holdTimeout, then blocked.
    subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-x", proxy, "http://198.51.100.7:81/"], capture_output=True, timeout=20
    )

    def moved() -> dict | None:
        m = _scrape(stack)
        ok = (
            m[("greyproxy_proxy_connections_total", (("result", "allowed"),))]
            >= before[("greyproxy_proxy_connections_total", (("result", "allowed"),))] + 3
            and m[("greyproxy_proxy_connections_total", (("result", "blocked"),))]
            >= before[("greyproxy_proxy_connections_total", (("result", "blocked"),))] + 1
            and m[("greyproxy_proxy_hold_seconds_count", ())] >= before[("greyproxy_proxy_hold_seconds_count", ())] + 1
            and m.get(("greyproxy_transactions_captured_total", ()), 0) >= 3
            and m[("greyproxy_proxy_bytes_relayed_total", (("side", "upstream"),))] >= 15000
            and m.get(("greyproxy_recorder_batches_total", ()), 0)
            > before.get(("greyproxy_recorder_batches_total", ()), 0)
        )
        return m if ok else None

    after = wait_for(moved, 15, interval=0.3, message="counters moving with the traffic")
    assert (
        after[("greyproxy_proxy_decision_seconds_count", ())]
        >= before[("greyproxy_proxy_decision_seconds_count", ())] + 4
    )
    assert after[("greyproxy_proxy_hold_seconds_sum", ())] >= 0.9  # one hold of holdTimeout = 1 s
    assert after[("greyproxy_recorder_batch_seconds_count", ())] >= 1
    assert ("greyproxy_journal_dropped_records_total", ()) in after
    assert ("greyproxy_proxy_held_connections", ()) in after
